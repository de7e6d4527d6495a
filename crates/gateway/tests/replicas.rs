//! Gateway replicas (issue #15): three gateways on one control cluster behind a round-robin
//! TCP balancer; an agent of ours holds one connection to each (the replicas it holds answer
//! 409 when the balancer sends it there again), so any replica routes any request, and a
//! replica restarted under load fails no request at the others and gets its agent back.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use buildplane_pki::Ca;
use cluster_gateway::{GatewayConfig, Replica, RunningGateway};
use common::Env;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(30);
const REPLICAS: u32 = 3;

/// How a [`Balancer`] picks a backend for each connection.
#[derive(Clone, Copy)]
enum Pick {
    /// At random, as kube-proxy's iptables mode does (a fixed sequence, so runs repeat).
    Random,
    /// Each backend `n` times in a row: an agent's next dials reach the replica it holds
    /// already, which a round robin would hide.
    Runs(usize),
}

/// A TCP balancer in front of the replicas' agent listeners, trying the others when the picked
/// one does not accept; a backend set to `None` is out, as a pod that is not ready.
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<Option<SocketAddr>>>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>, pick: Pick) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("balancer");
        let addr = listener.local_addr().expect("balancer address");
        let backends = Arc::new(Mutex::new(
            backends.into_iter().map(Some).collect::<Vec<_>>(),
        ));
        let table = backends.clone();
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let table = table.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    let candidates: Vec<Option<SocketAddr>> = table.lock().clone();
                    for _ in 0..candidates.len() {
                        let draw = next.fetch_add(1, Ordering::Relaxed);
                        let i = match pick {
                            Pick::Random => splitmix64(draw as u64) as usize,
                            Pick::Runs(n) => draw / n.max(1),
                        } % candidates.len();
                        let Some(backend) = candidates[i] else {
                            continue;
                        };
                        if let Ok(mut outbound) = TcpStream::connect(backend).await {
                            let _ = outbound.set_nodelay(true);
                            let _ = inbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { addr, backends }
    }

    fn set(&self, index: usize, backend: Option<SocketAddr>) {
        self.backends.lock()[index] = backend;
    }
}

/// A well-mixed pseudo-random number from `x` (SplitMix64's finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `Env`'s gateway as `gateway-0` of three, and two more replicas on the same control cluster.
async fn replicas(env: &mut Env) -> Vec<RunningGateway> {
    env.config.replica = Replica {
        id: "gateway-0".into(),
        count: REPLICAS,
    };
    env.stop_gateway().await;
    env.start_gateway().await;
    let mut others = Vec::new();
    for i in 1..REPLICAS {
        let mut config: GatewayConfig = env.config.clone();
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        config.agent_listen = localhost;
        config.internal_listen = localhost;
        config.health_listen = localhost;
        config.replica = Replica {
            id: format!("gateway-{i}"),
            count: REPLICAS,
        };
        others.push(cluster_gateway::start(config).await.expect("replica"));
    }
    others
}

/// GET through the proxy of the replica whose internal API is at `base`.
async fn proxy_at(env: &Env, base: &str, plane: &str) -> (u16, String) {
    let url = format!("{base}/api/proxy/buildplane/{plane}/org-a/bp/k8s/api/v1/namespaces");
    match env.http.get(url).send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.text().await.unwrap_or_default())
        }
        Err(err) => (0, err.to_string()),
    }
}

fn base_of(gateway: &RunningGateway) -> String {
    format!("https://127.0.0.1:{}", gateway.internal_addr.port())
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn all_replicas() -> Vec<String> {
    (0..REPLICAS).map(|i| format!("gateway-{i}")).collect()
}

/// Three replicas behind a balancer, a BuildPlane `org-a/bp` with planeID `p`, and an agent
/// of it connected to every replica.
struct Replicated {
    env: Env,
    others: Vec<RunningGateway>,
    balancer: Balancer,
    agent: Arc<cluster_agent::Agent>,
}

async fn replicated(pick: Pick) -> Replicated {
    let mut env = Env::start().await;
    let others = replicas(&mut env).await;
    let mut agent_addrs = vec![env.agent_addr];
    agent_addrs.extend(others.iter().map(|g| g.agent_addr));
    let balancer = Balancer::start(agent_addrs, pick).await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let server_ca = env.server_ca.cert_pem().to_owned();
    let url = format!("wss://127.0.0.1:{}/ws", balancer.addr.port());
    let agent = env.agent_to(&url, &server_ca, &leaf, "p", "buildplane", 2);
    env.eventually("a connection on every replica", WAIT, || async {
        sorted(agent.held_replicas()) == all_replicas()
    })
    .await;
    Replicated {
        env,
        others,
        balancer,
        agent,
    }
}

/// The agent ends up with one connection on every replica (never two on one), and a request
/// at any replica reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holds_one_connection_per_replica_and_any_replica_routes() {
    let Replicated {
        env, others, agent, ..
    } = replicated(Pick::Runs(4)).await;
    let mut bases = vec![env.base.clone()];
    bases.extend(others.iter().map(base_of));
    let shared: Vec<_> = std::iter::once(env.shared().clone())
        .chain(others.iter().map(|g| g.shared.clone()))
        .collect();
    // The agent reads the 101 before the replica has registered the connection.
    env.eventually("every replica registered its connection", WAIT, || async {
        shared.iter().all(|shared| shared.registry.all().len() == 1)
    })
    .await;
    for base in &bases {
        let (status, body) = proxy_at(&env, base, "p").await;
        assert_eq!(status, 200, "{base}: {body}");
    }
    // A while later nothing moved: the slots that found their replica stay, no connection is
    // replaced by a duplicate.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sorted(agent.held_replicas()), all_replicas());
    for shared in &shared {
        assert_eq!(shared.registry.all().len(), 1);
        assert_eq!(shared.registry.replaced_total(), 0);
    }
    // The start of a shutdown (`--shutdown-delay`): not ready, no new agent connection, and
    // the live one still serves.
    assert!(shared[1].is_ready());
    shared[1].not_ready();
    assert!(!shared[1].is_ready());
    let (status, body) = proxy_at(&env, &bases[1], "p").await;
    assert_eq!(status, 200, "a replica about to drain still serves: {body}");
    for gateway in others {
        gateway.shutdown(Duration::from_millis(50)).await.unwrap();
    }
}

/// A rolling restart of one replica under steady load at the others: no request fails, and
/// once it is back the agent holds a connection on it again and it routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_load_fails_no_request_at_the_others() {
    let Replicated {
        env,
        others,
        balancer,
        agent,
    } = replicated(Pick::Random).await;

    // Steady load on replicas 1 and 2 while replica 0 restarts.
    let bases: Vec<String> = others.iter().map(base_of).collect();
    let env = Arc::new(tokio::sync::Mutex::new(env));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    let http = env.lock().await.http.clone();
    for worker in 0..4 {
        let (bases, ok, failed, stop, http) = (
            bases.clone(),
            ok.clone(),
            failed.clone(),
            stop.clone(),
            http.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = worker;
            while !stop.is_cancelled() {
                let base = &bases[n % bases.len()];
                n += 1;
                let url = format!("{base}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces");
                match http.get(url).send().await {
                    Ok(res) if res.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(res) => {
                        let status = res.status();
                        let body = res.text().await.unwrap_or_default();
                        failed.lock().push(format!("{base}: {status} {body}"));
                    }
                    Err(err) => failed.lock().push(format!("{base}: {err}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let mut env = env.lock().await;
        balancer.set(0, None);
        env.stop_gateway().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        env.start_gateway().await;
        balancer.set(0, Some(env.agent_addr));
        // At once, before the agent is back on it: the young replica holds the request for
        // its agent instead of answering 503.
        let base = env.base.clone();
        let (status, body) = proxy_at(&env, &base, "p").await;
        assert_eq!(
            status, 200,
            "a request at the restarted replica waits for its agent: {body}"
        );
    }
    {
        let env = env.lock().await;
        env.eventually("the agent is back on gateway-0", WAIT, || async {
            env.shared().registry.all().len() == 1
                && sorted(agent.held_replicas()) == all_replicas()
        })
        .await;
        let base = env.base.clone();
        let (status, body) = proxy_at(&env, &base, "p").await;
        assert_eq!(status, 200, "the restarted replica routes again: {body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }
    let failed = failed.lock().clone();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed at the other replicas: {:?}",
        failed.len(),
        failed.len() as u64 + ok.load(Ordering::Relaxed),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 50, "the load ran");
    for gateway in others {
        gateway.shutdown(Duration::from_millis(50)).await.unwrap();
    }
}

// ---- A partition between one replica and the agents ----

/// A TCP relay to one backend that can be held, as a network partition holds a path: while
/// held nothing crosses either way (bytes wait in the kernel's buffers, a new connection waits
/// before it reaches the backend) and nothing is closed; released, everything flows again.
struct Relay {
    addr: SocketAddr,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Relay {
    async fn start(backend: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay");
        let addr = listener.local_addr().expect("relay address");
        let hold = Arc::new(tokio::sync::watch::Sender::new(false));
        let held = hold.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut held = held.subscribe();
                tokio::spawn(async move {
                    if held.wait_for(|h| !*h).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ar, aw) = inbound.into_split();
                    let (br, bw) = outbound.into_split();
                    tokio::join!(copy_held(ar, bw, held.clone()), copy_held(br, aw, held));
                });
            }
        });
        Relay { addr, hold }
    }

    fn partition(&self, held: bool) {
        self.hold.send_replace(held);
    }

    fn url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.addr.port())
    }
}

async fn copy_held(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read just before the partition: it crosses after the heal.
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Silence is detected within a second of probe plus this.
const LIVENESS: Duration = Duration::from_secs(1);
/// A request that waited on a connection gone silent is answered within this.
const FAILS_OVER_WITHIN: Duration = Duration::from_secs(5);

/// One gateway replica set for partition tests: heartbeats far longer than the test (silence,
/// not the heartbeat timeout, must do the work) and a short liveness timeout.
fn partition_config(config: &mut GatewayConfig) {
    config.heartbeat_interval = Duration::from_secs(30);
    config.heartbeat_timeout = Duration::from_secs(90);
    config.liveness_timeout = LIVENESS;
}

/// An agent of `leaf` dialling `url`, with the default heartbeats (a silent gateway is not
/// given up within the test) and a fast backoff.
fn slow_heartbeat_agent(
    env: &mut Env,
    url: &str,
    leaf: &buildplane_pki::Leaf,
    plane: &str,
) -> Arc<cluster_agent::Agent> {
    let mut config = cluster_agent::AgentConfig::new(url, plane);
    config.backoff = cluster_agent::backoff::Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(800),
    );
    let server_ca = env.server_ca.cert_pem().to_owned();
    env.agent_as_configured(config, &server_ca, leaf)
}

/// (status, body, elapsed) of one request at `base`.
async fn timed(
    env: &Env,
    method: reqwest::Method,
    base: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String, Duration, Option<String>) {
    let started = tokio::time::Instant::now();
    let url = format!("{base}/api/proxy/buildplane/p/org-a/bp/k8s{path}");
    let mut request = env.http.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    match request.send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            let to = res
                .headers()
                .get("x-buildplane-forwarded-to")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = res.text().await.unwrap_or_default();
            (status, body, started.elapsed(), to)
        }
        Err(err) => (0, err.to_string(), started.elapsed(), None),
    }
}

/// [`timed`] GET of the build cluster's namespaces at `base`.
async fn list_namespaces(env: &Env, base: &str) -> (u16, String, Duration, Option<String>) {
    timed(env, reqwest::Method::GET, base, "/api/v1/namespaces", None).await
}

/// A BuildPlane `org-a/bp` for planeID `p` and two agents of it (same certificate, two
/// instances): one through `relay` (to be partitioned), one straight to the gateway.
async fn two_agents(
    env: &mut Env,
    relay: &Relay,
) -> (Arc<cluster_agent::Agent>, Arc<cluster_agent::Agent>) {
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let cut = slow_heartbeat_agent(env, &relay.url(), &leaf, "p");
    let direct_url = env.agent_url();
    let direct = slow_heartbeat_agent(env, &direct_url, &leaf, "p");
    env.eventually("both agents are connected", WAIT, || async {
        env.shared().registry.on_plane("p").len() == 2
    })
    .await;
    (cut, direct)
}

/// One agent's connection is partitioned (its packets held, nothing closed) while the other's
/// serves: GETs that were waiting on the silent connection go to the other one within
/// seconds (not at the 90 s heartbeat timeout), the connection shows as silent, later GETs
/// never wait on it, and once healed it serves again.
/// Seen to fail without the fix: the GETs on the held connection waited the whole 30 s head
/// timeout and got 504 `AgentTimeout` (with no probe, nothing noticed the silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_detected_and_its_requests_fail_over() {
    let mut env = Env::start().await;
    partition_config(&mut env.config);
    env.stop_gateway().await;
    env.start_gateway().await;
    let relay = Relay::start(env.agent_addr).await;
    let _agents = two_agents(&mut env, &relay).await;
    let base = env.base.clone();
    let (status, body, ..) = list_namespaces(&env, &base).await;
    assert_eq!(status, 200, "{body}");

    relay.partition(true);
    let answers = futures::future::join_all((0..6).map(|_| list_namespaces(&env, &base))).await;
    for (status, body, elapsed, _) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(
            *elapsed < FAILS_OVER_WITHIN,
            "a GET on the silent connection was answered after {elapsed:?}"
        );
    }
    let silent: Vec<u64> = env
        .shared()
        .registry
        .on_plane("p")
        .iter()
        .filter(|c| c.is_silent())
        .map(|c| c.id)
        .collect();
    assert_eq!(
        silent.len(),
        1,
        "the partitioned connection shows as silent"
    );
    assert!(
        env.metrics()
            .await
            .contains("cluster_gateway_silent_connections{plane_id=\"p\"} 1")
    );
    for _ in 0..4 {
        let (status, body, elapsed, _) = list_namespaces(&env, &base).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            elapsed < Duration::from_secs(1),
            "a later GET waited {elapsed:?}"
        );
    }

    relay.partition(false);
    env.eventually("the healed connection is heard again", WAIT, || async {
        env.shared()
            .registry
            .on_plane("p")
            .iter()
            .all(|c| !c.is_silent())
    })
    .await;
    assert_eq!(
        env.shared().registry.on_plane("p").len(),
        2,
        "nothing was closed"
    );
}

/// A request other than GET or HEAD that was sent on a connection that then went silent is
/// not sent again (it may have run): it fails within seconds with 504 `AgentUnresponsive`,
/// and its twin on the live connection ran once.
/// Seen to fail without the fix: the POST on the held connection hung for the 30 s head
/// timeout and got 504 `AgentTimeout` only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_sent_to_a_silent_connection_is_not_sent_again() {
    let mut env = Env::start().await;
    partition_config(&mut env.config);
    env.stop_gateway().await;
    env.start_gateway().await;
    let relay = Relay::start(env.agent_addr).await;
    let _agents = two_agents(&mut env, &relay).await;
    let base = env.base.clone();
    relay.partition(true);
    // Round robin: of two POSTs at once, one goes on each connection.
    let configmap = |name: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}","namespace":"default"}}}}"#
        )
    };
    let (one, two) = (configmap("one"), configmap("two"));
    let path = "/api/v1/namespaces/default/configmaps";
    let (a, b) = tokio::join!(
        timed(&env, reqwest::Method::POST, &base, path, Some(&one)),
        timed(&env, reqwest::Method::POST, &base, path, Some(&two)),
    );
    let mut statuses = vec![a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 504], "{a:?} {b:?}");
    let refused = if a.0 == 504 { &a } else { &b };
    assert!(refused.1.contains("AgentUnresponsive"), "{}", refused.1);
    assert!(refused.1.contains("not sent again"), "{}", refused.1);
    assert!(
        refused.2 < FAILS_OVER_WITHIN,
        "answered after {:?}",
        refused.2
    );
    // The one on the silent connection was not re-sent on the live one.
    let (status, body, ..) = timed(&env, reqwest::Method::GET, &base, path, None).await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{body}");
}

/// `n` replicas on the control cluster (`env`'s gateway is `gateway-0`), told of each other
/// by EndpointSlices of a Service (`org-c/cluster-gateway`) as Kubernetes would list them.
async fn peered_replicas(env: &mut Env, n: usize) -> Vec<RunningGateway> {
    partition_config(&mut env.config);
    let (cert, key, ca) = env.internal_client_files.clone();
    let mut peers =
        cluster_gateway::peers::PeersConfig::new("org-c/cluster-gateway", (cert, key), ca).unwrap();
    peers.server_name = "localhost".into();
    env.config.peers = Some(peers);
    env.config.replica = Replica {
        id: "gateway-0".into(),
        count: 1,
    };
    env.stop_gateway().await;
    env.start_gateway().await;
    let mut others = Vec::new();
    for i in 1..n {
        let mut config: GatewayConfig = env.config.clone();
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        config.agent_listen = localhost;
        config.internal_listen = localhost;
        config.health_listen = localhost;
        config.replica.id = format!("gateway-{i}");
        others.push(cluster_gateway::start(config).await.expect("replica"));
    }
    let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        kube::Api::namespaced(env.control_client.clone(), "org-c");
    let ports = std::iter::once(env.gateway.as_ref().unwrap().internal_addr.port())
        .chain(others.iter().map(|g| g.internal_addr.port()));
    for (i, port) in ports.enumerate() {
        let id = format!("gateway-{i}");
        let slice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": format!("cluster-gateway-{id}"), "labels": {"kubernetes.io/service-name": "cluster-gateway"}},
            // The real server refuses loopback IPs in an IPv4 slice, and so does kube-sim.
            "addressType": "FQDN",
            "ports": [{"name": "internal", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [format!("{id}.localhost")], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": id, "namespace": "org-c"}}],
        }))
        .unwrap();
        slices
            .create(&kube::api::PostParams::default(), &slice)
            .await
            .expect("EndpointSlice created");
    }
    let shared: Vec<_> = std::iter::once(env.shared().clone())
        .chain(others.iter().map(|g| g.shared.clone()))
        .collect();
    env.eventually("each replica knows the others", WAIT, || async {
        shared
            .iter()
            .all(|s| s.peers.as_ref().is_some_and(|p| p.len() == n - 1))
    })
    .await;
    others
}

/// A BuildPlane `org-a/bp` for planeID `p` and its agent (one certificate, two instances)
/// on two replicas: one dialling `here_url` (gateway-0, or a relay in front of it), one
/// `other`; returns once each replica holds its connection.
async fn agent_on_both(
    env: &mut Env,
    here_url: &str,
    other: &RunningGateway,
) -> [Arc<cluster_agent::Agent>; 2] {
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let here = slow_heartbeat_agent(env, here_url, &leaf, "p");
    let other_url = format!("wss://127.0.0.1:{}/ws", other.agent_addr.port());
    let there = slow_heartbeat_agent(env, &other_url, &leaf, "p");
    env.eventually("the agent is on both replicas", WAIT, || async {
        env.shared().registry.on_plane("p").len() == 1
            && other.shared.registry.on_plane("p").len() == 1
    })
    .await;
    [here, there]
}

/// A replica partitioned from the agent (callers still reach it) forwards requests to its
/// sibling, which holds the agent: a GET that was waiting on the silent connection, and every
/// request after it, GET or POST, is answered by the sibling within seconds.
/// Seen to fail without the fix: the GET at the partitioned replica waited 30 s and got 504
/// `AgentTimeout`; with only detection (no forwarding), 503 `AgentUnresponsive`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_forwards_to_a_sibling() {
    let mut env = Env::start().await;
    let other = peered_replicas(&mut env, 2).await.remove(0);
    let relay = Relay::start(env.agent_addr).await;
    let _agents = agent_on_both(&mut env, &relay.url(), &other).await;
    let base = env.base.clone();
    let (status, body, _, to) = list_namespaces(&env, &base).await;
    assert_eq!(
        (status, to),
        (200, None),
        "served here while reachable: {body}"
    );

    relay.partition(true);
    let (status, body, elapsed, to) = list_namespaces(&env, &base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(to.as_deref(), Some("gateway-1"));
    assert!(elapsed < FAILS_OVER_WITHIN, "answered after {elapsed:?}");
    let cm =
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"fwd","namespace":"default"}}"#;
    let (status, body, elapsed, to) = timed(
        &env,
        reqwest::Method::POST,
        &base,
        "/api/v1/namespaces/default/configmaps",
        Some(cm),
    )
    .await;
    assert_eq!(
        status, 201,
        "a POST never sent to an agent may be forwarded: {body}"
    );
    assert_eq!(to.as_deref(), Some("gateway-1"));
    assert!(
        elapsed < Duration::from_secs(1),
        "forwarded at once: {elapsed:?}"
    );
    assert!(
        env.metrics()
            .await
            .contains("cluster_gateway_forwarded_requests_total{outcome=\"answered\"} 2")
    );
    relay.partition(false);
    env.eventually(
        "the healed replica serves on its own again",
        WAIT,
        || async {
            let (status, _, _, to) = list_namespaces(&env, &base).await;
            status == 200 && to.is_none()
        },
    )
    .await;
    other.shutdown(Duration::from_millis(50)).await.unwrap();
}

/// A request a sibling forwarded is never forwarded again: with no agent anywhere, a request
/// at one replica goes to the other once and comes back with its 503 at once, not bouncing
/// between them.
/// Seen to fail without the loop guard (the `x-buildplane-forwarded-by` check): the request
/// bounced between the replicas until the client gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_never_forwarded_again() {
    let mut env = Env::start().await;
    let other = peered_replicas(&mut env, 2).await.remove(0);
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let base = env.base.clone();
    let started = tokio::time::Instant::now();
    let url = format!("{base}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces");
    let res = env
        .http
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer, not a timeout");
    assert_eq!(res.status().as_u16(), 503);
    assert_eq!(
        res.headers()
            .get("x-buildplane-forwarded-to")
            .and_then(|v| v.to_str().ok()),
        Some("gateway-1")
    );
    let body = res.text().await.unwrap();
    assert!(body.contains("NoAgentConnected"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let forwarded = |metrics: &str, outcome: &str| {
        metrics.contains(&format!(
            "cluster_gateway_forwarded_requests_total{{outcome=\"{outcome}\"}} 1"
        ))
    };
    assert!(forwarded(&env.metrics().await, "answered"));
    let other_metrics = reqwest::get(format!("http://{}/metrics", other.health_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !other_metrics.contains("cluster_gateway_forwarded_requests_total{"),
        "the sibling forwarded nothing: {other_metrics}"
    );
    // A caller's own forwarded-by header also keeps the request here.
    let res = env
        .http
        .get(&url)
        .header("x-buildplane-forwarded-by", "someone")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    assert!(res.headers().get("x-buildplane-forwarded-to").is_none());
    other.shutdown(Duration::from_millis(50)).await.unwrap();
}

/// A replica that has begun its drain (its agent told to leave, and refused should it come
/// back) forwards what it can no longer serve to a sibling at once: a caller still on a
/// keep-alive connection to it is answered by the sibling, within a second.
/// Seen to fail without the fix: the request waited the 5 s `RECONNECT_WAIT` for an agent
/// that cannot reconnect to a leaving replica (in the `gateway-replicas-rolling-restart`
/// scenario, past the 5 s the harness gives a graceful stop: the caller's connection was cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_forwards_at_once() {
    let mut env = Env::start().await;
    let other = peered_replicas(&mut env, 2).await.remove(0);
    let here_url = env.agent_url();
    let _agents = agent_on_both(&mut env, &here_url, &other).await;
    let base = env.base.clone();
    let (status, body, _, to) = list_namespaces(&env, &base).await;
    assert_eq!(
        (status, to),
        (200, None),
        "served here before the drain: {body}"
    );
    let leaving = env.shared().clone();
    let gateway = env.gateway.take().expect("gateway-0 running");
    let stopping = tokio::spawn(gateway.shutdown(Duration::from_millis(50)));
    env.eventually("gateway-0 drained the agent's connection", WAIT, || async {
        leaving.drain_started.is_cancelled() && leaving.registry.on_plane("p").is_empty()
    })
    .await;
    let (status, body, elapsed, to) = list_namespaces(&env, &base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(to.as_deref(), Some("gateway-1"), "answered by the sibling");
    assert!(
        elapsed < Duration::from_secs(1),
        "forwarded at once, not after a wait: {elapsed:?}"
    );
    stopping
        .await
        .expect("shutdown task")
        .expect("no task ended before shutdown");
    other.shutdown(Duration::from_millis(50)).await.unwrap();
}

/// A replica without the agent's connection (an agent that holds one connection, as
/// OpenChoreo's do, to one replica of three) forwards to the sibling that holds it: a sibling
/// that has no connection of the plane either answers 503 without sending the request
/// anywhere, so the next one is asked.
/// Seen to fail when the first sibling's answer was final: half the requests got the other
/// sibling's 503 `NoAgentConnected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_finds_the_sibling_that_holds_the_agent() {
    let mut env = Env::start().await;
    let others = peered_replicas(&mut env, 3).await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let url = format!("wss://127.0.0.1:{}/ws", others[1].agent_addr.port());
    let _agent = slow_heartbeat_agent(&mut env, &url, &leaf, "p");
    env.eventually("the agent is on gateway-2", WAIT, || async {
        others[1].shared.registry.on_plane("p").len() == 1
    })
    .await;
    let base = env.base.clone();
    for _ in 0..4 {
        let (status, body, elapsed, to) = list_namespaces(&env, &base).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(to.as_deref(), Some("gateway-2"));
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }
    for gateway in others {
        gateway.shutdown(Duration::from_millis(50)).await.unwrap();
    }
}

/// A request a sibling forwarded was counted against its planeID's rate where it arrived: the
/// replica it is forwarded to does not count it again, so a plane gets the rate
/// `--plane-rate-limit` says, not a fraction of it. The mark is believed only on a sibling's
/// connection (here the test's client presents the peers' certificate); a caller's own mark is
/// counted (`security::a_flooding_plane_is_throttled_and_its_neighbour_is_not`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_siblings_forward_is_not_counted_again() {
    let mut env = Env::start().await;
    env.config.plane_rate = Some(cluster_gateway::rate::PlaneRate {
        per_second: std::num::NonZeroU32::new(1).unwrap(),
        burst: std::num::NonZeroU32::new(1).unwrap(),
        bytes_per_token: None,
    });
    let other = peered_replicas(&mut env, 2).await.remove(0);
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let url = format!(
        "{}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces",
        env.base
    );
    for n in 0..4 {
        let res = env
            .http
            .get(&url)
            .header("x-buildplane-forwarded-by", "gateway-1")
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        assert_eq!(status, 503, "forward {n} was counted again: {body}");
        assert!(body.contains("NoAgentConnected"), "{body}");
    }
    // A caller's request is counted: the burst of one, then 429.
    let (status, body) = proxy_at(&env, &env.base, "p").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = proxy_at(&env, &env.base, "p").await;
    assert_eq!(status, 429, "{body}");
    other.shutdown(Duration::from_millis(50)).await.unwrap();
}
