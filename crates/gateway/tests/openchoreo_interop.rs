//! Interop with OpenChoreo's own cluster-gateway and cluster-agent, at both pinned versions:
//! v1.0.0 (standing in for v0.17.0, the last `buildplane` release, which the module proxy
//! refuses: PEERS.md) and the newest v1.x, both in the `workflowplane` dialect. They run as
//! processes on 127.0.0.1 against our gateway and agent, with kube-sim as both API servers.
//! Every test runs once per version (`_v1_0` and `_newest`).
//!
//! - OpenChoreo's agent through our gateway: registration, proxied requests (a query string, a
//!   JSON body, a binary body, 10 MiB each way, a 404 of the build cluster, 50 at once), a
//!   response over the v1 message limit failing alone, a caller's `Authorization` kept at our
//!   gateway (v1.0's agent would pass it on), and two replicas sharing a certificate counted as
//!   two; a CA change revokes it (closed, refused on reconnect) and re-admits it; it comes back
//!   by itself after our gateway restarts (twice).
//! - Our agent behind OpenChoreo's gateway: the same requests, the subprotocol fallback, the
//!   unknown-target error, exec and Hubble streams refused without losing the connection (v1.1
//!   on: v1.0's gateway has no such streams), two of our agents on one certificate; a CA change
//!   as OpenChoreo's gateway follows it (only when notified) and what our agent sees.
//!
//! They need the binaries `cargo xtask peers build` puts in the peers cache, so they are ignored
//! by default: `cargo test -p cluster-gateway --test openchoreo_interop -- --include-ignored`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Mutex, atomic::Ordering},
    time::Duration,
};

use base64::Engine as _;
use cluster_agent::Agent;
use common::{DAY, Env};
use futures::future::join_all;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ObjectMeta, Patch, PatchParams, PostParams},
    discovery::ApiResource,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// One pinned OpenChoreo version, and what its programs take.
#[derive(Clone, Debug)]
struct OpenChoreo {
    version: String,
}

impl OpenChoreo {
    /// The oldest pin: v1.0.0, the served version nearest v0.17.0.
    fn v1_0() -> OpenChoreo {
        let version = Self::pins().remove(0);
        assert!(version.starts_with("v1.0."), "{version}");
        OpenChoreo { version }
    }

    /// The newest pinned v1.x.
    fn newest() -> OpenChoreo {
        let version = Self::pins().pop().expect("an OpenChoreo pin");
        OpenChoreo { version }
    }

    fn pins() -> Vec<String> {
        buildplane_peers::cache::openchoreo_versions().unwrap_or_else(|err| panic!("{err}"))
    }

    /// The program (`cluster-gateway`, `cluster-agent`), or a panic naming the command that
    /// builds it.
    fn binary(&self, program: &str) -> PathBuf {
        buildplane_peers::cache::openchoreo_program(&self.version, program)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Whether its gateway serves `/api/*` on a listener of its own (`--internal-port`, mTLS
    /// with `--internal-client-ca-cert`), as from v1.1 on; v1.0's serves it beside `/ws` on
    /// `--port`, asking for no client certificate it checks. Read from its `-help`.
    fn gateway_has_internal_listener(&self) -> bool {
        let help = std::process::Command::new(self.binary("cluster-gateway"))
            .arg("-help")
            .output()
            .expect("cluster-gateway -help");
        let text = String::from_utf8_lossy(&help.stderr);
        assert!(text.contains("-heartbeat-interval"), "{text}");
        text.contains("-internal-port")
    }

    /// Whether its gateway and agent carry exec and Hubble streams (`HTTPTunnelStreamInit`):
    /// not v1.0 (its gateway has no `/api/exec/` or `/api/wirelogs/`).
    fn has_streams(&self) -> bool {
        !self.version.starts_with("v1.0.")
    }

    /// Its CRDs, copied from its `config/crd/bases` into `tests/data/openchoreo-<version>/`.
    fn crd_path(&self, file: &str) -> String {
        format!(
            "{}/tests/data/openchoreo-{}/{file}",
            env!("CARGO_MANIFEST_DIR"),
            self.version
        )
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A peer process: killed when dropped; its log printed when the test fails.
struct Peer {
    name: String,
    log: PathBuf,
    child: Mutex<tokio::process::Child>,
}

impl Peer {
    fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Peer {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("{}: {err}", program.display()));
        Peer {
            name: name.into(),
            log,
            child: Mutex::new(child),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of its log containing `needle`.
    fn count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn assert_running(&self) {
        let exited = self.child.lock().expect("not poisoned").try_wait();
        if let Ok(Some(status)) = exited {
            panic!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Peer {
    /// Kills the process and waits (up to 5 s) until it has exited, so that the ports it bound
    /// (OpenChoreo's gateway's :8080) are free for the next test.
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.start_kill();
        for _ in 0..250 {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// OpenChoreo's gateway serves its health endpoints on :8080, with no flag to move them, and
/// exits when that port is taken: one at a time on this machine (a lock across processes).
fn openchoreo_gateway_lock() -> std::fs::File {
    let path = std::env::temp_dir().join("buildplane-openchoreo-gateway.lock");
    let file = std::fs::File::create(&path).expect("lock file");
    file.lock().expect("lock");
    // The previous holder's gateway has exited (`Peer` waits for it); give the kernel a moment
    // more, and name the port when another program holds it.
    let mut tries = 0;
    while let Err(err) = std::net::TcpListener::bind("0.0.0.0:8080") {
        tries += 1;
        assert!(
            tries < 100,
            "port 8080 is taken ({err}): OpenChoreo's gateway binds its health server there"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    file
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// OpenChoreo's agent for `plane_id`, dialling our gateway in the `workflowplane` dialect with
/// the certificate in `cert`/`key`, serving the build cluster (the same flags in v1.0 and v1.2).
fn openchoreo_agent(
    oc: &OpenChoreo,
    env: &Env,
    name: &str,
    plane_id: &str,
    cert: &Path,
    key: &Path,
) -> Peer {
    let dir = env.dir.path();
    let kubeconfig = dir.join("build.kubeconfig");
    env.build.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let server_ca = write(dir, "gateway-ca.crt", env.server_ca.cert_pem());
    let args = [
        format!("--server-url={}", env.agent_url()),
        "--plane-type=workflowplane".into(),
        format!("--plane-id={plane_id}"),
        format!("--client-cert={}", cert.display()),
        format!("--client-key={}", key.display()),
        format!("--server-ca={}", server_ca.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--reconnect-delay=300ms".into(),
        "--log-level=debug".into(),
    ];
    Peer::spawn(name, &oc.binary("cluster-agent"), &args, dir)
}

/// OpenChoreo's gateway on free loopback ports, reading WorkflowPlanes in the control cluster
/// (its CRDs installed here), with our gateway's serving certificate and (v1.1 on) internal
/// client CA, so `env.http` calls its internal API as it calls ours. v1.0 serves that API on the
/// agents' port, without checking the client certificate `env.http` presents.
struct OpenChoreoGateway {
    peer: Peer,
    agent_port: u16,
    base: String,
    _lock: std::fs::File,
}

impl OpenChoreoGateway {
    async fn start(oc: &OpenChoreo, env: &Env) -> OpenChoreoGateway {
        let program = oc.binary("cluster-gateway");
        let split = oc.gateway_has_internal_listener();
        let lock = openchoreo_gateway_lock();
        install_openchoreo_crds(oc, &env.control_client).await;
        let dir = env.dir.path();
        let kubeconfig = dir.join("control.kubeconfig");
        let agent_port = free_port();
        let mut args = vec![
            format!("--port={agent_port}"),
            format!("--server-cert={}", dir.join("tls.crt").display()),
            format!("--server-key={}", dir.join("tls.key").display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--heartbeat-interval=2s".into(),
            "--heartbeat-timeout=6s".into(),
            "--log-level=debug".into(),
        ];
        let internal_port = if split {
            let port = free_port();
            args.push(format!("--internal-port={port}"));
            args.push(format!(
                "--internal-client-ca-cert={}",
                dir.join("internal-ca.crt").display()
            ));
            port
        } else {
            agent_port
        };
        let peer = Peer::spawn("openchoreo-gateway", &program, &args, dir);
        let base = format!("https://127.0.0.1:{internal_port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            peer.assert_running();
            let up = env
                .http
                .get(format!("{base}/api/v1/planes/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "OpenChoreo's gateway did not come up:\n{}",
                peer.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        OpenChoreoGateway {
            peer,
            agent_port,
            base,
            _lock: lock,
        }
    }

    fn agent_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.agent_port)
    }

    /// `connectedAgents` of a WorkflowPlane's planeID, from its status API.
    async fn connected_agents(&self, env: &Env, plane_id: &str) -> u64 {
        self.status(env, plane_id, "").await
    }

    /// Waits until our `agent` (offering v2 and v1) is connected and OpenChoreo's gateway counts
    /// it, then holds that its first dial was its only one: the gateway names no subprotocol
    /// and our agent speaks v1 on that connection. (Seen to fail when the agent closed such a
    /// connection and dialled again offering nothing: for a moment the gateway had no agent,
    /// and a request then got 502.)
    async fn our_agent_registered_once(&self, env: &Env, agent: &Agent, plane_id: &str) {
        env.eventually(
            "our agent registered at OpenChoreo's gateway",
            WAIT,
            || async { agent.is_connected() && self.connected_agents(env, plane_id).await == 1 },
        )
        .await;
        assert_eq!(
            self.peer.count("agent connected successfully"),
            1,
            "one dial, one registration:\n{}",
            self.peer.log_text()
        );
        assert_eq!(self.peer.count("agent disconnected"), 0, "no redial");
    }

    /// `connectedAgents` authorised for the WorkflowPlane `ns/name` (its per-CR status).
    async fn authorized_agents(&self, env: &Env, plane_id: &str, ns: &str, name: &str) -> u64 {
        self.status(env, plane_id, &format!("?namespace={ns}&name={name}"))
            .await
    }

    async fn status(&self, env: &Env, plane_id: &str, query: &str) -> u64 {
        let url = format!(
            "{}/api/v1/planes/workflowplane/{plane_id}/status{query}",
            self.base
        );
        let Ok(res) = env.http.get(url).send().await else {
            return 0;
        };
        let status: Value = res.json().await.unwrap_or_default();
        status["connectedAgents"].as_u64().unwrap_or(0)
    }

    /// What OpenChoreo's controller posts after a WorkflowPlane changed (`event` `created`,
    /// `updated` or `deleted`): its gateway's answer.
    async fn notify(&self, env: &Env, plane_id: &str, ns: &str, name: &str, event: &str) -> Value {
        let res = env
            .http
            .post(format!("{}/api/v1/planes/notify", self.base))
            .header("content-type", "application/json")
            .body(
                json!({
                    "planeType": "workflowplane", "planeID": plane_id, "event": event,
                    "namespace": ns, "name": name,
                })
                .to_string(),
            )
            .send()
            .await
            .expect("notify");
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }
}

async fn install_openchoreo_crds(oc: &OpenChoreo, control: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(control.clone());
    for file in [
        "openchoreo.dev_workflowplanes.yaml",
        "openchoreo.dev_clusterworkflowplanes.yaml",
    ] {
        let path = oc.crd_path(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("a CRD");
        if let Err(err) = crds.create(&PostParams::default(), &crd).await {
            assert!(err.to_string().contains("AlreadyExists"), "{file}: {err}");
        }
    }
}

fn workflow_planes(control: &Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "openchoreo.dev".into(),
        version: "v1alpha1".into(),
        api_version: "openchoreo.dev/v1alpha1".into(),
        kind: "WorkflowPlane".into(),
        plural: "workflowplanes".into(),
    };
    Api::namespaced_with(control.clone(), ns, &resource)
}

/// Replaces the `clientCA.value` of the WorkflowPlane `ns/name` (a CA change).
async fn set_workflow_plane_ca(control: &Client, ns: &str, name: &str, ca_pem: &str) {
    let patch = json!({"spec": {"clusterAgent": {"clientCA": {"value": ca_pem}}}});
    workflow_planes(control, ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("WorkflowPlane patched");
}

/// An OpenChoreo `WorkflowPlane` trusting `ca_pem` (inline `clientCA.value`, as the chart does).
async fn workflow_plane(control: &Client, ns: &str, name: &str, plane_id: &str, ca_pem: &str) {
    let api = workflow_planes(control, ns);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "openchoreo.dev/v1alpha1",
        "kind": "WorkflowPlane",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"planeID": plane_id, "clusterAgent": {"clientCA": {"value": ca_pem}}},
    }))
    .expect("a WorkflowPlane");
    api.create(&PostParams::default(), &object)
        .await
        .expect("WorkflowPlane created");
}

/// Creates a namespace in the build cluster with `labels`.
async fn namespace(build: &Client, name: &str, labels: &[(&str, &str)]) {
    let api: Api<Namespace> = Api::all(build.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    if let Err(err) = api.create(&PostParams::default(), &ns).await {
        assert!(err.to_string().contains("AlreadyExists"), "{name}: {err}");
    }
}

/// Fills namespace `ns` of the build cluster with `n` ConfigMaps of 960,000 bytes each (under
/// the API server's 1 MiB object limit), so that listing them answers `n` × ~0.92 MiB.
async fn big_config_maps(build: &Client, ns: &str, n: usize) {
    namespace(build, ns, &[]).await;
    let api: Api<ConfigMap> = Api::namespaced(build.clone(), ns);
    for i in 0..n {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("big-{i}")),
                ..ObjectMeta::default()
            },
            data: Some([("v".to_owned(), "x".repeat(960_000))].into()),
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &cm)
            .await
            .expect("ConfigMap created");
    }
}

fn pb_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn pb_field(number: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    pb_varint(number << 3 | 2, &mut out);
    pb_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A ConfigMap `name` with `binaryData.blob = blob`, in the Kubernetes protobuf envelope (a
/// binary request body, as `kubectl create configmap` sends).
fn protobuf_config_map(name: &str, blob: &[u8]) -> Vec<u8> {
    let meta = pb_field(1, name.as_bytes());
    let entry = [pb_field(1, b"blob"), pb_field(2, blob)].concat();
    let raw = [pb_field(1, &meta), pb_field(3, &entry)].concat();
    let type_meta = [pb_field(1, b"v1"), pb_field(2, b"ConfigMap")].concat();
    [
        b"k8s\0".to_vec(),
        pb_field(1, &type_meta),
        pb_field(2, &raw),
    ]
    .concat()
}

/// The requests every pair must carry, through the proxy at `base` (`.../k8s`) to the build
/// cluster; `tag` keeps the objects of each pair apart.
async fn exercise_proxy(http: &reqwest::Client, base: &str, build: &Client, tag: &str) {
    // A query string: a label selector, percent-encoded and as OpenChoreo's callers send it
    // (unencoded `=`), and a limit.
    namespace(build, &format!("{tag}-a"), &[("team", &format!("{tag}-a"))]).await;
    namespace(build, &format!("{tag}-b"), &[("team", &format!("{tag}-b"))]).await;
    for query in [
        format!("labelSelector=team%3D{tag}-a&limit=10"),
        format!("labelSelector=team={tag}-a&limit=10"),
    ] {
        let res = http
            .get(format!("{base}/api/v1/namespaces?{query}"))
            .send()
            .await
            .expect("GET namespaces");
        assert_eq!(res.status(), 200, "{query}");
        let list: Value = res.json().await.expect("JSON");
        let names: Vec<&str> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, [format!("{tag}-a")], "{query}");
    }

    // A JSON body, read back.
    let configmaps = format!("{base}/api/v1/namespaces/{tag}-a/configmaps");
    let res = http
        .post(&configmaps)
        .header("content-type", "application/json")
        .body(
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "json"},
                "data": {"greeting": "grüße <&>"},
            })
            .to_string(),
        )
        .send()
        .await
        .expect("POST JSON");
    assert_eq!(
        res.status(),
        201,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let got: Value = http
        .get(format!("{configmaps}/json"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(got["data"]["greeting"], "grüße <&>");

    // A binary body (protobuf, every byte value), read back as JSON.
    let blob: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let res = http
        .post(&configmaps)
        .header("content-type", "application/vnd.kubernetes.protobuf")
        .body(protobuf_config_map("binary", &blob))
        .send()
        .await
        .expect("POST protobuf");
    assert_eq!(
        res.status(),
        201,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let got: Value = http
        .get(format!("{configmaps}/binary"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        got["binaryData"]["blob"],
        base64::engine::general_purpose::STANDARD.encode(&blob)
    );

    // 10 MiB each way. The API server refuses a request body over 3 MiB itself, so its own 413
    // (`RequestEntityTooLarge`, not a gateway's) shows the 10 MiB crossed the tunnel.
    let ten_mib = vec![b' '; 10 * 1024 * 1024];
    let res = http
        .post(&configmaps)
        .header("content-type", "application/json")
        .body(ten_mib)
        .send()
        .await
        .expect("POST 10 MiB");
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("RequestEntityTooLarge"), "{body}");
    big_config_maps(build, &format!("{tag}-big"), 11).await;
    let res = http
        .get(format!("{base}/api/v1/namespaces/{tag}-big/configmaps"))
        .send()
        .await
        .expect("GET 10 MiB");
    assert_eq!(res.status(), 200);
    let body = res.bytes().await.expect("10 MiB body");
    assert!(body.len() > 10 * 1024 * 1024, "{} bytes", body.len());
    let list: Value = serde_json::from_slice(&body).expect("JSON");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 11);
    assert!(
        items
            .iter()
            .all(|i| i["data"]["v"].as_str().is_some_and(|v| v.len() == 960_000))
    );

    // A 404 of the build cluster: its status and its Status body.
    let res = http
        .get(format!("{configmaps}/missing"))
        .send()
        .await
        .expect("GET missing");
    assert_eq!(res.status(), 404);
    let status: Value = res.json().await.expect("a Status");
    assert_eq!(status["reason"], "NotFound", "{status}");

    // 50 at once.
    let namespace_url = format!("{base}/api/v1/namespaces/{tag}-a");
    let answers = join_all((0..50).map(|_| http.get(&namespace_url).send())).await;
    let statuses: Vec<u16> = answers
        .into_iter()
        .map(|r| r.map(|r| r.status().as_u16()).unwrap_or(0))
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// The ids of our gateway's live connections.
async fn connection_ids(env: &Env) -> Vec<u64> {
    let (_, body) = env.get("/api/v1/connections").await;
    let table: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut ids: Vec<u64> = table["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

/// `connectedAgents` of `plane_id` at our gateway, asked under `plane_type`.
async fn our_connected_agents(env: &Env, plane_type: &str, plane_id: &str) -> u64 {
    let (_, body) = env
        .get(&format!("/api/v1/planes/{plane_type}/{plane_id}/status"))
        .await;
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["connectedAgents"].as_u64())
        .unwrap_or(0)
}

/// OpenChoreo's agent, as its Helm chart deploys it (a self-signed leaf pasted into the CR as
/// `clientCA.value`, `--plane-type=workflowplane`), registers at our gateway, which carries
/// every kind of request to it and back; a response over the v1 limit fails alone; a second
/// replica with the same certificate is a sibling, so the plane counts two.
async fn openchoreo_agent_through_our_gateway(oc: OpenChoreo) {
    let env = Env::start().await;
    let leaf = buildplane_pki::self_signed_client("wp1", DAY).expect("agent leaf");
    env.build_plane("org-a", "wp", "wp1", &leaf.cert_pem).await;
    let dir = env.dir.path().to_owned();
    let cert = write(&dir, "oc-agent.crt", &leaf.cert_pem);
    let key = write(&dir, "oc-agent.key", &leaf.key_pem);
    let first = openchoreo_agent(&oc, &env, "openchoreo-agent-1", "wp1", &cert, &key);

    // Registration, one planeID space: either planeType reaches the same connection.
    env.eventually("OpenChoreo's agent registered", WAIT, || async {
        first.assert_running();
        our_connected_agents(&env, "workflowplane", "wp1").await == 1
    })
    .await;
    assert_eq!(our_connected_agents(&env, "buildplane", "wp1").await, 1);
    let ids = connection_ids(&env).await;
    assert_eq!(ids.len(), 1, "{ids:?}");

    let base = format!("{}/api/proxy/workflowplane/wp1/org-a/wp/k8s", env.base);
    let build = env.build_cluster.client.clone();
    exercise_proxy(&env.http, &base, &build, "oca").await;
    // The same plane through the other planeType name.
    let res = env
        .http
        .get(format!(
            "{}/api/proxy/buildplane/wp1/org-a/wp/k8s/api/v1/namespaces/oca-a",
            env.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A caller's credentials stay at our gateway. OpenChoreo v1.0's agent would pass an
    // `Authorization` header on to the API server, which refuses a token it does not know (401);
    // v1.2's strips it, and so does our gateway before either sees it.
    let res = env
        .http
        .get(format!("{base}/api/v1/namespaces/oca-a"))
        .header("authorization", "Bearer a-caller-token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );

    // A response over the v1 message limit (~12 MiB of body) fails that request only: the
    // request beside it is answered, and the connection is the same one.
    big_config_maps(&build, "oca-huge", 15).await;
    let huge = env
        .http
        .get(format!("{base}/api/v1/namespaces/oca-huge/configmaps"))
        .send();
    let small = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        env.http
            .get(format!("{base}/api/v1/namespaces/oca-a"))
            .send()
            .await
    };
    let (huge, small) = tokio::join!(huge, small);
    let huge = huge.expect("an answer");
    let status = huge.status();
    let body = huge.text().await.unwrap_or_default();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("too large"), "{body}");
    assert_eq!(small.expect("an answer").status(), 200);
    assert_eq!(connection_ids(&env).await, ids, "the connection stayed");
    let res = env
        .http
        .get(format!("{base}/api/v1/namespaces/oca-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A second replica with the same certificate: siblings, both counted, neither evicted.
    let second = openchoreo_agent(&oc, &env, "openchoreo-agent-2", "wp1", &cert, &key);
    env.eventually("two replicas counted", WAIT, || async {
        second.assert_running();
        our_connected_agents(&env, "workflowplane", "wp1").await == 2
    })
    .await;
    let both = connection_ids(&env).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        connection_ids(&env).await,
        both,
        "no replica evicted the other"
    );
    assert_eq!(our_connected_agents(&env, "workflowplane", "wp1").await, 2);
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("cluster_gateway_replaced_connections_total 0"),
        "{metrics}"
    );
    let answers = join_all((0..10).map(|_| {
        env.http
            .get(format!("{base}/api/v1/namespaces/oca-a"))
            .send()
    }))
    .await;
    assert!(
        answers
            .into_iter()
            .all(|r| r.is_ok_and(|r| r.status() == 200))
    );
    first.assert_running();
    second.assert_running();
}

/// Our agent, with its default settings (offering v2), connects to OpenChoreo's gateway, falls
/// back to v1 when the gateway names no subprotocol, and stays; every kind of request reaches
/// the build cluster through it; `--protocol v1` offers nothing and connects at once; a second
/// of our agents on the first one's certificate is a third replica, and each gets requests.
async fn our_agent_behind_openchoreos_gateway(oc: OpenChoreo) {
    let mut env = Env::start().await;
    let gateway = OpenChoreoGateway::start(&oc, &env).await;
    let agent_ca = buildplane_pki::Ca::generate("agent-ca", DAY).expect("agent CA");
    workflow_plane(
        &env.control_client,
        "org-a",
        "wp",
        "wp2",
        agent_ca.cert_pem(),
    )
    .await;
    let leaf = agent_ca.issue_client("wp2", DAY).expect("leaf");
    let server_ca = env.server_ca.cert_pem().to_owned();
    let agent = env.agent_to(
        &gateway.agent_url(),
        &server_ca,
        &leaf,
        "wp2",
        "workflowplane",
        2,
    );
    gateway.our_agent_registered_once(&env, &agent, "wp2").await;
    let registrations = gateway.peer.count("agent connected successfully");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.is_connected());
    assert_eq!(gateway.connected_agents(&env, "wp2").await, 1, "it stays");
    assert_eq!(
        gateway.peer.count("agent connected successfully"),
        registrations,
        "no reconnect"
    );

    let base = format!("{}/api/proxy/workflowplane/wp2/org-a/wp/k8s", gateway.base);
    let build = env.build_cluster.client.clone();
    exercise_proxy(&env.http, &base, &build, "ocg").await;

    // A target our agent does not serve: OpenChoreo's 404 (its gateway drops the error text).
    let res = env
        .http
        .get(format!(
            "{}/api/proxy/workflowplane/wp2/org-a/wp/monitoring/api/v1/query",
            gateway.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    // A response over the v1 limit fails alone (OpenChoreo's gateway answers 502).
    big_config_maps(&build, "ocg-huge", 15).await;
    let res = env
        .http
        .get(format!("{base}/api/v1/namespaces/ocg-huge/configmaps"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);

    if oc.has_streams() {
        refused_streams(&env, &gateway, &agent).await;
    } else {
        // v1.0's gateway has neither endpoint: its mux answers 404 before any agent is asked.
        for path in [
            "/api/wirelogs/workflowplane/wp2/org-a/wp?environment=dev&namespace=default",
            "/api/exec/workflowplane/wp2/org-a/wp?podNamespace=default&podName=p&command=sh",
        ] {
            let res = env
                .http
                .get(format!("{}{path}", gateway.base))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 404, "{path}");
        }
        assert_eq!(agent.ignored.load(Ordering::Relaxed), 0);
    }
    let res = env
        .http
        .get(format!("{base}/api/v1/namespaces/ocg-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        gateway.peer.count("agent connected successfully"),
        registrations,
        "the connection stayed through all of it"
    );

    // `--protocol v1` offers no subprotocol, as OpenChoreo's agent, and is admitted as a
    // second replica of the plane.
    let other = agent_ca.issue_client("wp2", DAY).expect("leaf");
    let explicit = env.agent_to(
        &gateway.agent_url(),
        &server_ca,
        &other,
        "wp2",
        "workflowplane",
        1,
    );
    env.eventually("the v1 agent registered too", WAIT, || async {
        gateway.connected_agents(&env, "wp2").await == 2
    })
    .await;
    assert!(explicit.is_connected());
    assert_eq!(
        gateway.peer.count("agent connected successfully"),
        registrations + 1,
        "one dial, no fallback"
    );

    // Two replicas on one certificate (as a Deployment of two with one Secret): our second
    // agent presents the first one's leaf, is admitted beside it, and OpenChoreo's round
    // robin gives each of the three connections its share.
    let twin = env.agent_to(
        &gateway.agent_url(),
        &server_ca,
        &leaf,
        "wp2",
        "workflowplane",
        2,
    );
    env.eventually("the twin registered too", WAIT, || async {
        gateway.connected_agents(&env, "wp2").await == 3
    })
    .await;
    let replicas = [&agent, &explicit, &twin];
    let before: Vec<usize> = replicas
        .iter()
        .map(|a| a.requests.load(Ordering::Relaxed))
        .collect();
    let answers = join_all((0..12).map(|_| {
        env.http
            .get(format!("{base}/api/v1/namespaces/ocg-a"))
            .send()
    }))
    .await;
    assert!(
        answers
            .into_iter()
            .all(|r| r.is_ok_and(|r| r.status() == 200))
    );
    for (i, (replica, before)) in replicas.iter().zip(before).enumerate() {
        let served = replica.requests.load(Ordering::Relaxed) - before;
        assert!(served >= 1, "replica {i} served {served} of 12");
    }
    assert!(agent.is_connected() && explicit.is_connected() && twin.is_connected());
    assert_eq!(
        gateway.connected_agents(&env, "wp2").await,
        3,
        "no one evicted"
    );
}

/// Exec and Hubble wirelogs are streams our agent does not serve (v1.1 on): it closes them at
/// once with its reason, as OpenChoreo's agent does when it cannot serve one, and the
/// connection stays.
async fn refused_streams(env: &Env, gateway: &OpenChoreoGateway, agent: &cluster_agent::Agent) {
    let started = tokio::time::Instant::now();
    let res = env
        .http
        .get(format!(
            "{}/api/wirelogs/workflowplane/wp2/org-a/wp?environment=dev&namespace=default",
            gateway.base
        ))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("agent rejected stream"), "{body}");
    assert!(
        body.contains("not supported by this cluster agent"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let exec = env
        .http1
        .get(format!(
            "{}/api/exec/workflowplane/wp2/org-a/wp?podNamespace=default&podName=p&command=sh",
            gateway.base
        ))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(exec.status(), 101);
    let mut upgraded = exec.upgrade().await.expect("upgraded");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut upgraded, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the exec stream was closed at once, not after OpenChoreo's 30 s wait"
    );
    env.eventually("OpenChoreo's gateway saw the refusals", WAIT, || async {
        gateway.peer.count("Agent closed stream immediately") == 1
            && gateway
                .peer
                .count("Agent closed wirelogs stream immediately")
                == 1
    })
    .await;
    assert!(agent.ignored.load(Ordering::Relaxed) >= 2);
}

/// A CA change at our gateway, with OpenChoreo's agent as the agent (the chart's way: a new
/// self-signed leaf pasted into the CR, so the old one no longer chains). Our gateway revokes
/// the live connection (closed, as for our agent) and refuses the old certificate on each of
/// the agent's reconnects; an agent with the new certificate is admitted; when the CR trusts
/// both, the old agent is re-admitted by its own reconnect loop.
/// (Seen to fail against the gateway built with `chaos-defect-skip-revocation`: the revoked
/// connection stays and keeps serving.)
async fn ca_change_at_our_gateway(oc: OpenChoreo) {
    let env = Env::start().await;
    let dir = env.dir.path().to_owned();
    let old = buildplane_pki::self_signed_client("wp1", DAY).expect("agent leaf");
    env.build_plane("org-a", "wp", "wp1", &old.cert_pem).await;
    let old_cert = write(&dir, "old.crt", &old.cert_pem);
    let old_key = write(&dir, "old.key", &old.key_pem);
    let first = openchoreo_agent(
        &oc,
        &env,
        "openchoreo-agent-old",
        "wp1",
        &old_cert,
        &old_key,
    );
    env.eventually("OpenChoreo's agent registered", WAIT, || async {
        first.assert_running();
        our_connected_agents(&env, "workflowplane", "wp1").await == 1
    })
    .await;
    let url = format!(
        "{}/api/proxy/workflowplane/wp1/org-a/wp/k8s/api/v1/namespaces/default",
        env.base
    );
    let get = || async { env.http.get(&url).send().await.map(|r| r.status().as_u16()) };
    assert_eq!(get().await.ok(), Some(200));

    // The CA changes: the old leaf no longer chains to it.
    let new = buildplane_pki::self_signed_client("wp1", DAY).expect("agent leaf");
    env.build_plane("org-a", "wp", "wp1", &new.cert_pem).await;
    env.eventually("the old agent revoked", WAIT, || async {
        our_connected_agents(&env, "workflowplane", "wp1").await == 0
    })
    .await;
    assert_eq!(get().await.ok(), Some(503), "no agent for the plane");
    // It keeps dialling every 300 ms with the old certificate and is refused each time.
    let refused = |metrics: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("cluster_gateway_rejections_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let refused_before = refused(&env.metrics().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.assert_running();
    assert_eq!(our_connected_agents(&env, "workflowplane", "wp1").await, 0);
    assert!(
        refused(&env.metrics().await) >= refused_before + 2,
        "its reconnects are refused:\n{}",
        env.metrics().await
    );
    assert_eq!(get().await.ok(), Some(503));

    // An agent with the new certificate is admitted and serves.
    let new_cert = write(&dir, "new.crt", &new.cert_pem);
    let new_key = write(&dir, "new.key", &new.key_pem);
    let second = openchoreo_agent(
        &oc,
        &env,
        "openchoreo-agent-new",
        "wp1",
        &new_cert,
        &new_key,
    );
    env.eventually("the new agent registered", WAIT, || async {
        second.assert_running();
        our_connected_agents(&env, "workflowplane", "wp1").await == 1
    })
    .await;
    assert_eq!(get().await.ok(), Some(200));

    // The CR trusts both: the old agent is re-admitted on its next reconnect.
    let both = format!("{}{}", old.cert_pem, new.cert_pem);
    env.build_plane("org-a", "wp", "wp1", &both).await;
    env.eventually("the old agent re-admitted", WAIT, || async {
        our_connected_agents(&env, "workflowplane", "wp1").await == 2
    })
    .await;
    let answers = join_all((0..10).map(|_| get())).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(200))), "{answers:?}");
    first.assert_running();
    second.assert_running();
}

/// A CA change with OpenChoreo's gateway as the gateway. It reads the WorkflowPlanes only at
/// connect time and when OpenChoreo's controller notifies it (`POST /api/v1/planes/notify`):
/// until then our agent, now untrusted, stays authorised. The notification revokes the CR's
/// authorisation but keeps the connection open: our agent sees nothing (no close, no error, no
/// reconnect), and requests get OpenChoreo's 403. Renewing our agent's leaf from the new CA
/// makes it connect anew (verified against the new CA at connect), and drain the old
/// connection; requests flow again, with no notification.
/// (Seen to fail with our agent's renewal hand-over disabled: the proxy stays at 403.)
async fn ca_change_at_openchoreos_gateway(oc: OpenChoreo) {
    let mut env = Env::start().await;
    let gateway = OpenChoreoGateway::start(&oc, &env).await;
    let old_ca = buildplane_pki::Ca::generate("agent-ca-old", DAY).expect("agent CA");
    workflow_plane(&env.control_client, "org-a", "wp", "wp3", old_ca.cert_pem()).await;
    let leaf = old_ca.issue_client("wp3", DAY).expect("leaf");
    let server_ca = env.server_ca.cert_pem().to_owned();
    let agent = env.agent_to(
        &gateway.agent_url(),
        &server_ca,
        &leaf,
        "wp3",
        "workflowplane",
        2,
    );
    gateway.our_agent_registered_once(&env, &agent, "wp3").await;
    assert_eq!(
        gateway.authorized_agents(&env, "wp3", "org-a", "wp").await,
        1
    );
    let url = format!(
        "{}/api/proxy/workflowplane/wp3/org-a/wp/k8s/api/v1/namespaces/default",
        gateway.base
    );
    let get = || async {
        let res = env.http.get(&url).send().await.expect("an answer");
        (res.status().as_u16(), res.text().await.unwrap_or_default())
    };
    assert_eq!(get().await.0, 200);
    let registrations = gateway.peer.count("agent connected successfully");

    // The CA changes in the CR: OpenChoreo's gateway does not watch, so nothing changes yet.
    let new_ca = buildplane_pki::Ca::generate("agent-ca-new", DAY).expect("agent CA");
    set_workflow_plane_ca(&env.control_client, "org-a", "wp", new_ca.cert_pem()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get().await.0, 200, "still authorised until notified");

    // OpenChoreo's controller would now notify it: the authorisation is revoked, the
    // connection kept.
    let answer = gateway.notify(&env, "wp3", "org-a", "wp", "updated").await;
    assert_eq!(answer["action"], "revalidate", "{answer}");
    assert_eq!(answer["authorizationsRevoked"], 1, "{answer}");
    let (status, body) = get().await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not authorized for CR org-a/wp"), "{body}");
    assert_eq!(
        gateway.authorized_agents(&env, "wp3", "org-a", "wp").await,
        0
    );
    assert_eq!(
        gateway.connected_agents(&env, "wp3").await,
        1,
        "still connected"
    );
    // What our agent sees: nothing. It stays connected on the same connection (heartbeats go
    // on) and is sent no request.
    let served = agent.requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.is_connected());
    assert_eq!(agent.connected.load(Ordering::SeqCst), 1);
    assert_eq!(
        gateway.peer.count("agent connected successfully"),
        registrations,
        "no reconnect"
    );
    assert_eq!(agent.requests.load(Ordering::Relaxed), served);
    assert_eq!(get().await.0, 403);

    // Its leaf is renewed from the new CA: it connects anew (admitted under the new CA), then
    // drains the old connection; no notification needed.
    let renewed = new_ca.issue_client("wp3", DAY).expect("leaf");
    agent
        .cert
        .replace_from_pem(&renewed.cert_pem, &renewed.key_pem)
        .expect("renewed leaf");
    agent.certificate_renewed();
    env.eventually("requests flow again", WAIT, || async {
        get().await.0 == 200
    })
    .await;
    env.eventually("the old connection drained", WAIT, || async {
        gateway.connected_agents(&env, "wp3").await == 1
    })
    .await;
    assert_eq!(
        gateway.authorized_agents(&env, "wp3", "org-a", "wp").await,
        1
    );
    assert_eq!(
        gateway.peer.count("agent connected successfully"),
        registrations + 1
    );
    assert!(agent.is_connected());
    let answers = join_all((0..10).map(|_| get())).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
}

/// OpenChoreo's agent comes back by itself when our gateway restarts as a rolling update
/// restarts it (a drain, which v1 cannot announce: the connection closes once idle; then the
/// same ports again), twice, as the same process, and requests reach the build cluster through
/// it again.
async fn openchoreo_agent_after_our_gateway_restarts(oc: OpenChoreo) {
    let mut env = Env::start().await;
    let leaf = buildplane_pki::self_signed_client("wp1", DAY).expect("agent leaf");
    env.build_plane("org-a", "wp", "wp1", &leaf.cert_pem).await;
    let dir = env.dir.path().to_owned();
    let cert = write(&dir, "oc-agent.crt", &leaf.cert_pem);
    let key = write(&dir, "oc-agent.key", &leaf.key_pem);
    let agent = openchoreo_agent(&oc, &env, "openchoreo-agent", "wp1", &cert, &key);
    env.eventually("OpenChoreo's agent registered", WAIT, || async {
        agent.assert_running();
        our_connected_agents(&env, "workflowplane", "wp1").await == 1
    })
    .await;
    for restart in 1..=2 {
        let url = format!(
            "{}/api/proxy/workflowplane/wp1/org-a/wp/k8s/api/v1/namespaces/default",
            env.base
        );
        let status = env.http.get(&url).send().await.map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(200), "before restart {restart}");
        env.stop_gateway().await;
        assert!(
            env.http.get(&url).send().await.is_err(),
            "nothing answers while our gateway is down"
        );
        env.start_gateway().await;
        env.eventually(
            &format!("OpenChoreo's agent back after restart {restart}"),
            WAIT,
            || async {
                agent.assert_running();
                our_connected_agents(&env, "workflowplane", "wp1").await == 1
            },
        )
        .await;
        env.eventually(
            &format!("a request through it after restart {restart}"),
            WAIT,
            || async {
                let status = env.http.get(&url).send().await.map(|r| r.status().as_u16());
                status.ok() == Some(200)
            },
        )
        .await;
    }
    agent.assert_running();
}

/// One `#[tokio::test]` per pair and pinned OpenChoreo version.
macro_rules! per_version {
    ($($name:ident => $body:ident($version:ident);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        #[ignore = "needs OpenChoreo's binaries: cargo xtask peers build"]
        async fn $name() {
            $body(OpenChoreo::$version()).await;
        }
    )*};
}

per_version! {
    openchoreo_agent_through_our_gateway_v1_0 => openchoreo_agent_through_our_gateway(v1_0);
    openchoreo_agent_through_our_gateway_newest => openchoreo_agent_through_our_gateway(newest);
    our_agent_behind_openchoreos_gateway_v1_0 => our_agent_behind_openchoreos_gateway(v1_0);
    our_agent_behind_openchoreos_gateway_newest => our_agent_behind_openchoreos_gateway(newest);
    openchoreo_agent_ca_change_at_our_gateway_v1_0 => ca_change_at_our_gateway(v1_0);
    openchoreo_agent_ca_change_at_our_gateway_newest => ca_change_at_our_gateway(newest);
    our_agent_ca_change_at_openchoreos_gateway_v1_0 => ca_change_at_openchoreos_gateway(v1_0);
    our_agent_ca_change_at_openchoreos_gateway_newest => ca_change_at_openchoreos_gateway(newest);
    openchoreo_agent_after_our_gateway_restarts_v1_0 => openchoreo_agent_after_our_gateway_restarts(v1_0);
    openchoreo_agent_after_our_gateway_restarts_newest => openchoreo_agent_after_our_gateway_restarts(newest);
}
