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
