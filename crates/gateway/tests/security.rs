//! Issue #19 over real sockets: the proxy's path policy, the accepted planeTypes, the generic
//! 401 of the agent listener, and the internal listener's client CA reload.

mod common;

use std::{
    num::NonZeroU32,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use buildplane_api::served::ServedCrs;
use buildplane_pki::Ca;
use cluster_agent::Agent;
use common::{DAY, Env};

const WAIT: Duration = Duration::from_secs(10);

/// A request through the proxy: (status, body).
async fn proxied(env: &Env, method: reqwest::Method, path: &str) -> (u16, String) {
    let url = format!("{}/api/proxy/buildplane/p/org-a/bp/k8s{path}", env.base);
    match env
        .http
        .request(method, url)
        .header("content-type", "application/json")
        .body(r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{}}"#)
        .send()
        .await
    {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.text().await.unwrap_or_default())
        }
        Err(err) => (0, err.to_string()),
    }
}

/// Denied paths are refused with 403 `PathBlocked` in every spelling (an empty segment, the
/// legacy watch prefix, percent-encoded slashes, TokenRequest) and never reach the agent, while
/// paths beside them (`/api/v1/serviceaccounts`, `/api/v1/secrets-backup`) are forwarded, with
/// empty segments collapsed. (Before the policy module, `/api/v1//secrets` and the watch
/// variants got 200 from the build cluster and the TokenRequest was forwarded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_denies_every_spelling_of_a_denied_path() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;

    let blocked = [
        (reqwest::Method::GET, "/api/v1/secrets"),
        (reqwest::Method::GET, "/api/v1//secrets"),
        (reqwest::Method::GET, "//api/v1/secrets"),
        (reqwest::Method::GET, "/api/v1/secrets/"),
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/kube-system//secrets",
        ),
        (reqwest::Method::GET, "/api/v1/watch/secrets"),
        (
            reqwest::Method::GET,
            "/api/v1/watch/namespaces/kube-system/secrets",
        ),
        // The router decodes once: `%2F` is a slash, `%73` an `s`.
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/kube-system%2Fsecrets",
        ),
        (reqwest::Method::GET, "/api/v1/%73ecrets"),
        (
            reqwest::Method::POST,
            "/api/v1/namespaces/default/serviceaccounts/default/token",
        ),
    ];
    let before = agent.requests.load(Ordering::SeqCst);
    for (method, path) in blocked {
        let (status, body) = proxied(&env, method.clone(), path).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("PathBlocked"), "{method} {path}: {body}");
    }
    // Encoded twice: the API server would decode the rest, so it is refused.
    let (status, body) = proxied(
        &env,
        reqwest::Method::GET,
        "/api/v1/namespaces/kube-system%252Fsecrets",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("InvalidPath"), "{body}");
    assert_eq!(
        agent.requests.load(Ordering::SeqCst),
        before,
        "no refused request reached the agent"
    );

    let (status, body) = proxied(&env, reqwest::Method::GET, "/api/v1/serviceaccounts").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ServiceAccountList"), "{body}");
    let (status, body) = proxied(&env, reqwest::Method::GET, "/api/v1//namespaces/").await;
    assert_eq!(status, 200, "the normalised path was forwarded: {body}");
    assert!(body.contains("NamespaceList"), "{body}");
    let (status, body) = proxied(&env, reqwest::Method::GET, "/api/v1/secrets-backup").await;
    assert_eq!(
        status, 404,
        "forwarded, and unknown to the API server: {body}"
    );
    assert_eq!(
        agent.requests.load(Ordering::SeqCst),
        before + 3,
        "the allowed requests reached the agent"
    );
}

/// The agent listener, the proxy and the plane routes serve exactly `buildplane` and
/// `workflowplane` (one planeID space) and answer 400 to any other planeType. (Before, agents
/// dialing `dataplane` or `observabilityplane` were admitted as build planes, and
/// `reconnect` under any planeType closed the build plane's agents.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_build_plane_types_are_served() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
    let leaf = ca.issue_client("p", DAY).unwrap();

    for plane_type in ["dataplane", "observabilityplane", "BuildPlane", ""] {
        let res = env
            .raw_connect(
                &format!("?planeID=p&planeType={plane_type}"),
                Some(&leaf),
                None,
            )
            .await
            .map(drop);
        let (status, body) = res.expect_err("refused");
        assert_eq!(status, 400, "{plane_type:?}: {body}");
        assert!(body.contains("workflowplane"), "{body}");

        for (method, path) in [
            (
                reqwest::Method::GET,
                format!("/api/proxy/{plane_type}/p/org-a/bp/k8s/api/v1/namespaces"),
            ),
            (
                reqwest::Method::GET,
                format!("/api/v1/planes/{plane_type}/p/status"),
            ),
            (
                reqwest::Method::POST,
                format!("/api/v1/planes/{plane_type}/p/reconnect"),
            ),
        ] {
            if plane_type.is_empty() {
                continue; // an empty segment does not route at all
            }
            let res = env
                .http
                .request(method.clone(), format!("{}{path}", env.base))
                .send()
                .await
                .expect("answered");
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            assert_eq!(status, 400, "{method} {path}: {body}");
            assert!(body.contains("InvalidPlaneType"), "{method} {path}: {body}");
        }
    }
    assert_eq!(env.connections().await, 1, "no reconnect went through");

    let (ws, _) = env
        .raw_admitted("?planeID=p&planeType=workflowplane", &leaf, None)
        .await;
    env.eventually(
        "one planeID space: both agents count under either name",
        WAIT,
        || async {
            let (_, body) = env.get("/api/v1/planes/workflowplane/p/status").await;
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["connectedAgents"] == 2
        },
    )
    .await;
    for plane_type in ["workflowplane", "buildplane"] {
        let (_, body) = env
            .get(&format!("/api/v1/planes/{plane_type}/p/status"))
            .await;
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            status["planeType"], plane_type,
            "answered under the name asked"
        );
    }
    // The raw peer answers nothing: close it so the next request goes to the real agent.
    drop(ws);
    env.eventually("the raw peer is gone", WAIT, || async {
        env.connections().await == 1
    })
    .await;
    let (status, body) = env
        .get("/api/proxy/workflowplane/p/org-a/bp/k8s/api/v1/namespaces")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("NamespaceList"), "{body}");
}

/// A 401 tells an unauthenticated caller nothing: a random self-signed certificate dialing a
/// planeID shared by two CRs (one with a missing clientCA Secret) gets the same generic body as
/// a dial to a planeID nobody has, naming no CR, namespace or Secret; the detail stays in the
/// gateway (its log, from `Trust::admit`) and the rejection metric tells the cases apart.
/// (Before, the body listed `org-a/bp: ... secret org-a/hidden-ca-secret not found; ...`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_callers_get_a_generic_401() {
    let env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane_from(
        "org-a",
        "tenant-one",
        "p",
        common::from_secret("hidden-ca-secret", None, "ca.crt"),
    )
    .await;
    env.build_plane("org-b", "tenant-two", "p", ca.cert_pem())
        .await;
    let stranger = buildplane_pki::self_signed_client("p", DAY).unwrap();
    let chain = buildplane_pki::parse_cert_bundle(stranger.cert_pem.as_bytes()).unwrap();
    env.eventually("the gateway sees both CRs", WAIT, || async {
        env.shared()
            .trust
            .admit("p", &chain, &ServedCrs::any())
            .refused
            .len()
            == 2
    })
    .await;

    let (status, shared_plane) = env
        .raw_connect("?planeID=p&planeType=buildplane", Some(&stranger), None)
        .await
        .map(drop)
        .expect_err("a stranger is refused");
    assert_eq!(status, 401, "{shared_plane}");
    let (status, unknown_plane) = env
        .raw_connect(
            "?planeID=nobody&planeType=buildplane",
            Some(&stranger),
            None,
        )
        .await
        .map(drop)
        .expect_err("an unknown planeID is refused");
    assert_eq!(status, 401, "{unknown_plane}");
    assert_eq!(shared_plane, cluster_gateway::agents::NOT_ACCEPTED);
    assert_eq!(
        unknown_plane, shared_plane,
        "whether a planeID exists does not show"
    );
    for secret in [
        "org-a",
        "org-b",
        "tenant-one",
        "tenant-two",
        "hidden-ca-secret",
    ] {
        assert!(
            !shared_plane.contains(secret),
            "{secret} leaked: {shared_plane}"
        );
    }

    // What the gateway logs instead, and the metric that tells the cases apart.
    let refused = env
        .shared()
        .trust
        .admit("p", &chain, &ServedCrs::any())
        .refused;
    let detail = format!("{refused:?}");
    assert!(detail.contains("hidden-ca-secret"), "{detail}");
    let metrics = env.metrics().await;
    for reason in ["not_authorized", "unknown_plane"] {
        assert!(
            metrics.contains(&format!(
                "cluster_gateway_rejections_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
}

/// An internal-API client whose certificate comes from `ca`, trusting the gateway's serving CA.
fn internal_client(env: &Env, leaf: &buildplane_pki::Leaf) -> reqwest::Client {
    buildplane_runtime::internal_api_client(
        env.server_ca.cert_pem().as_bytes(),
        format!("{}{}", leaf.cert_pem, leaf.key_pem).as_bytes(),
    )
    .and_then(|builder| {
        builder
            .build()
            .map_err(buildplane_runtime::InternalClientError::from)
    })
    .expect("internal API client")
}

async fn status_of(client: &reqwest::Client, env: &Env) -> Result<u16, String> {
    client
        .get(format!("{}/api/v1/connections", env.base))
        .send()
        .await
        .map(|res| res.status().as_u16())
        .map_err(|err| format!("{err:?}"))
}

/// Replacing `--internal-client-ca` takes effect without a restart: new handshakes of the old
/// CA's clients are refused (with or without a session to resume), a live connection of an old
/// client (an event stream) is closed, and a client of the new CA is served. (Before, the CA
/// was read once at start and the old client went on being served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_client_ca_reload_refuses_the_old_ca() {
    let env = Env::start().await;
    let old_client = env.http.clone();
    assert_eq!(status_of(&old_client, &env).await, Ok(200));
    let events = old_client
        .get(format!("{}/api/v1/events", env.base))
        .send()
        .await
        .expect("event stream");
    assert_eq!(events.status(), 200);
    let mut events = events.bytes_stream();
    let snapshot = futures::StreamExt::next(&mut events).await;
    assert!(
        matches!(snapshot, Some(Ok(_))),
        "snapshot line: {snapshot:?}"
    );

    let new_ca = Ca::generate("new-internal-ca", DAY).unwrap();
    let new_leaf = new_ca.issue_client("controller", DAY).unwrap();
    std::fs::write(&env.config.internal_client_ca, new_ca.cert_pem()).unwrap();

    env.eventually("a fresh client of the old CA is refused", WAIT, || async {
        let (cert, key, _) = &env.internal_client_files;
        let old_leaf = buildplane_pki::Leaf {
            cert_pem: std::fs::read_to_string(cert).unwrap(),
            key_pem: std::fs::read_to_string(key).unwrap(),
        };
        status_of(&internal_client(&env, &old_leaf), &env)
            .await
            .is_err()
    })
    .await;
    let res = status_of(&internal_client(&env, &new_leaf), &env).await;
    assert_eq!(res, Ok(200), "the new CA's client is served");
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match futures::StreamExt::next(&mut events).await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return format!("ended with {err}"),
                None => return "ended".to_owned(),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the old client's live event stream was closed");
    // The client that had sessions with the gateway (resumption tickets, pooled connections).
    let res = status_of(&old_client, &env).await;
    assert!(res.is_err(), "the old client is refused: {res:?}");
}

/// A client that connects to the internal API and never starts its TLS handshake is dropped
/// after the handshake timeout (10 s) instead of holding its socket and task forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_listener_drops_a_silent_handshake() {
    use tokio::io::AsyncReadExt;

    let env = Env::start().await;
    let addr = env.gateway.as_ref().unwrap().internal_addr;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the gateway closed the socket: {read:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "not before the timeout"
    );
}

/// An idle TCP connection from `source` to the agent listener: connected, never a byte.
async fn idle_from(env: &Env, source: [u8; 4]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    socket.connect(env.agent_addr).await.unwrap()
}

/// A sample of the gateway's metrics, by its series (name and labels); 0 before the first.
async fn sample(env: &Env, series: &str) -> u64 {
    let prefix = format!("{series} ");
    env.metrics()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// The count of a rejection reason in the gateway's metrics.
async fn rejections(env: &Env, reason: &str) -> u64 {
    sample(
        env,
        &format!("cluster_gateway_rejections_total{{reason=\"{reason}\"}}"),
    )
    .await
}

/// Pre-authentication denial of service: sockets that never send a byte, or stall in the middle
/// of their ClientHello, hold no handshake slot, so an agent is admitted while many of them are
/// open. (Before, each held a slot for
/// the 10 s handshake timeout: two idle sockets stalled every admission with two slots, and an
/// attacker reopening them kept agents out indefinitely.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_hold_no_handshake_slot() {
    let mut env = Env::start().await;
    env.stop_gateway().await;
    env.config.max_concurrent_handshakes = 2;
    env.config.max_idle_per_source = 1_000;
    env.config.hello_timeout = Duration::from_secs(60);
    env.start_gateway().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let query = "?planeID=p&planeType=buildplane&agentID=a";
    drop(env.raw_admitted(query, &leaf, None).await);

    let mut idle = Vec::new();
    for i in 0..20u8 {
        let mut socket = idle_from(&env, [127, 0, 1, i]).await;
        if i % 2 == 1 {
            // Half of them start a ClientHello and stall: a TLS handshake record header that
            // announces 512 bytes, and ten of them (the slowloris that held a slot before).
            use tokio::io::AsyncWriteExt;
            let mut partial = vec![0x16, 0x03, 0x01, 0x02, 0x00];
            partial.extend([0u8; 10]);
            socket
                .write_all(&partial)
                .await
                .expect("partial ClientHello");
        }
        idle.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Well under the 10 s in which a slot-holding idle socket's handshake would time out.
    let admitted = tokio::time::timeout(
        Duration::from_secs(5),
        env.raw_connect(query, Some(&leaf), None),
    )
    .await
    .expect("admitted while 10 idle sockets and 10 stalled ClientHellos are open");
    assert!(admitted.is_ok(), "{:?}", admitted.map(drop));
    drop(idle);
}

/// Idle sockets are capped per source address (the rest are closed at once) and closed after
/// `--hello-timeout`; another address keeps its own allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_capped_per_source_and_time_out() {
    use tokio::io::AsyncReadExt;
    let mut env = Env::start().await;
    env.stop_gateway().await;
    env.config.max_idle_per_source = 3;
    env.config.hello_timeout = Duration::from_millis(500);
    env.start_gateway().await;

    let mut sockets = Vec::new();
    for _ in 0..8 {
        sockets.push(idle_from(&env, [127, 0, 0, 2]).await);
    }
    env.eventually("five closed at once", WAIT, || async {
        rejections(&env, "idle_per_source").await == 5
    })
    .await;
    for _ in 0..3 {
        sockets.push(idle_from(&env, [127, 0, 0, 3]).await);
    }
    env.eventually("the other six timed out", WAIT, || async {
        rejections(&env, "hello_timeout").await == 6
    })
    .await;
    assert_eq!(
        rejections(&env, "idle_per_source").await,
        5,
        "the second address was within its own allowance"
    );
    for mut socket in sockets {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("every idle socket is closed by the gateway");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}

/// A planeID and a clientCA each hold at most their cap of connections, whatever the number of
/// keys a tenant mints: past it the upgrade gets 429 with the reason, while other planeIDs and
/// other CAs are unaffected. (Before, only the per-key cap existed, and fresh keys of one CA
/// could open any number of connections.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_plane_and_per_ca() {
    let mut env = Env::start().await;
    env.stop_gateway().await;
    env.config.connection_caps.per_plane = 2;
    env.config.connection_caps.per_ca = 3;
    env.start_gateway().await;
    let tenant = Ca::generate("tenant-ca", DAY).unwrap();
    let other = Ca::generate("other-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", tenant.cert_pem()).await;
    env.build_plane("org-a", "bp2", "p2", tenant.cert_pem())
        .await;
    env.build_plane("org-b", "bp", "q", other.cert_pem()).await;
    let connect = |plane: &'static str, ca: &Ca, instance: usize| {
        let leaf = ca.issue_client(plane, DAY).unwrap();
        let query = format!("?planeID={plane}&planeType=buildplane&agentID=i{instance}");
        (leaf, query)
    };
    let mut held = Vec::new();
    for i in 0..2 {
        let (leaf, query) = connect("p", &tenant, i);
        held.push(env.raw_admitted(&query, &leaf, None).await);
    }
    env.eventually("two on p", WAIT, || async { env.connections().await == 2 })
        .await;
    let (leaf, query) = connect("p", &tenant, 2);
    let (status, body) = env
        .raw_connect(&query, Some(&leaf), None)
        .await
        .map(drop)
        .expect_err("a third key on p is over the plane cap");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("planeID"), "{body}");

    // The same CA on another planeID: one more fits under the CA cap, the next does not.
    let (leaf, query) = connect("p2", &tenant, 0);
    held.push(env.raw_admitted(&query, &leaf, None).await);
    env.eventually("three of the tenant's CA", WAIT, || async {
        env.connections().await == 3
    })
    .await;
    let (leaf, query) = connect("p2", &tenant, 1);
    let (status, body) = env
        .raw_connect(&query, Some(&leaf), None)
        .await
        .map(drop)
        .expect_err("a fourth key of the tenant's CA is over the CA cap");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("CA"), "{body}");
    assert_eq!(rejections(&env, "plane_cap").await, 1);
    assert_eq!(rejections(&env, "ca_cap").await, 1);

    // Another tenant is unaffected.
    let (leaf, query) = connect("q", &other, 0);
    held.push(env.raw_admitted(&query, &leaf, None).await);
    // A freed place is usable again.
    held.remove(0);
    let (leaf, query) = connect("p", &tenant, 3);
    held.push(env.raw_admitted(&query, &leaf, None).await);
}

/// The gateway's count of connections re-verified after trust changes.
async fn reverified(env: &Env) -> u64 {
    sample(env, "cluster_gateway_reverified_connections_total").await
}

/// Waits until the re-verification count stops moving (the initial watch events settle).
async fn settled_reverified(env: &Env) -> u64 {
    let mut last = reverified(env).await;
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = reverified(env).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A Secret change re-verifies the connections of the planes whose CRs read that Secret, and
/// only those; a change of any other Secret in the cluster re-verifies nothing, and only the
/// named Secret's data is held. (Before, every
/// Secret change anywhere re-verified every live connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_changes_reverify_only_the_planes_that_read_them() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let other_ca = Ca::generate("other-ca", DAY).unwrap();
    env.secret("org-a", "agent-ca", "ca.crt", ca.cert_pem())
        .await;
    env.build_plane_from(
        "org-a",
        "bp",
        "p",
        common::from_secret("agent-ca", None, "ca.crt"),
    )
    .await;
    env.build_plane("org-b", "bp", "q", other_ca.cert_pem())
        .await;
    let _p = env.agent(&ca, "p", 2);
    let _q = env.agent(&other_ca, "q", 2);
    env.eventually("both agents connected", WAIT, || async {
        env.connections().await == 2
    })
    .await;
    let before = settled_reverified(&env).await;

    env.secret("org-a", "unrelated", "token", "x").await;
    env.secret("org-a", "unrelated", "token", "y").await;
    env.secret("kube-system", "elsewhere", "token", "z").await;
    assert_eq!(
        settled_reverified(&env).await,
        before,
        "Secrets no CR reads re-verify nothing"
    );

    let bundle = format!("{}{}", ca.cert_pem(), other_ca.cert_pem());
    env.secret("org-a", "agent-ca", "ca.crt", &bundle).await;
    env.eventually("the reader's plane was re-verified", WAIT, || async {
        reverified(&env).await > before
    })
    .await;
    assert_eq!(
        settled_reverified(&env).await,
        before + 1,
        "only p's connection was re-verified, not q's"
    );
    assert_eq!(env.connections().await, 2);

    // Back to the CA alone: p's chain met that bundle at admission, so its re-verification is
    // answered from the verdict cache (a new bundle never is: the change above was a miss).
    let hits = sample(&env, "cluster_gateway_verdict_cache_hits_total").await;
    let misses = sample(&env, "cluster_gateway_verdict_cache_misses_total").await;
    env.secret("org-a", "agent-ca", "ca.crt", ca.cert_pem())
        .await;
    assert_eq!(settled_reverified(&env).await, before + 2);
    assert_eq!(
        sample(&env, "cluster_gateway_verdict_cache_hits_total").await,
        hits + 1,
        "the known (chain, bundle) pair is remembered"
    );
    assert_eq!(
        sample(&env, "cluster_gateway_verdict_cache_misses_total").await,
        misses
    );
    assert_eq!(env.connections().await, 2);

    // Of the cluster's Secrets, the gateway holds the data of the one a CR names, fetched when
    // the CR named it (it existed before), and lets it go when no CR names it any more.
    let cached = || async { sample(&env, "cluster_gateway_cached_secrets").await };
    assert_eq!(cached().await, 1, "only agent-ca is held");
    env.delete_build_plane("org-a", "bp").await;
    env.eventually("agent-ca let go", WAIT, || async { cached().await == 0 })
        .await;
}

/// A CR that names a Secret the gateway's watch has already gone past (and, no CR naming it
/// then, dropped) still admits: the gateway fetches the Secret when a CR first names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_named_after_its_creation_is_fetched() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.secret("org-a", "agent-ca", "ca.crt", ca.cert_pem())
        .await;
    // Let the watch see the Secret while no CR names it (ordering, not a timing assertion).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sample(&env, "cluster_gateway_cached_secrets").await, 0);
    env.build_plane_from(
        "org-a",
        "bp",
        "p",
        common::from_secret("agent-ca", None, "ca.crt"),
    )
    .await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
    assert_eq!(sample(&env, "cluster_gateway_cached_secrets").await, 1);
}

/// A gateway limiting each planeID to `per_second` requests (`burst` at once, a token per
/// `bytes_per_token` of answer when set), with two tenants served through it: planeID `noisy`
/// (BuildPlane org-a/noisy) and `quiet` (org-b/quiet), and their agents.
async fn two_tenants(
    per_second: u32,
    burst: u32,
    bytes_per_token: Option<u32>,
) -> (Env, Arc<Agent>, Arc<Agent>) {
    let mut env = Env::start().await;
    env.stop_gateway().await;
    env.config.plane_rate = Some(cluster_gateway::rate::PlaneRate {
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
        bytes_per_token: bytes_per_token.and_then(NonZeroU32::new),
    });
    env.start_gateway().await;
    let noisy_ca = Ca::generate("noisy-ca", DAY).unwrap();
    let quiet_ca = Ca::generate("quiet-ca", DAY).unwrap();
    env.build_plane("org-a", "noisy", "noisy", noisy_ca.cert_pem())
        .await;
    env.build_plane("org-b", "quiet", "quiet", quiet_ca.cert_pem())
        .await;
    let noisy = env.agent(&noisy_ca, "noisy", 2);
    let quiet = env.agent(&quiet_ca, "quiet", 2);
    env.wait_proxy_status("noisy", "org-a", "noisy", 200, WAIT)
        .await;
    env.wait_proxy_status("quiet", "org-b", "quiet", 200, WAIT)
        .await;
    (env, noisy, quiet)
}

/// `--plane-rate-limit`: a planeID past its burst gets 429 `PlaneRateLimited` with
/// `Retry-After`, and its agent never sees the refused request; another planeID on the same
/// gateway is served meanwhile; a token refilled is a request admitted again. (Before the
/// limit, every one of the flooding planeID's requests reached its agent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_plane_is_throttled_and_its_neighbour_is_not() {
    let (env, noisy, _quiet) = two_tenants(1, 3, None).await;
    // Both buckets full again.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let before = noisy.requests.load(Ordering::SeqCst);
    let limited = "cluster_gateway_proxy_failures_total{reason=\"plane_rate_limited\"}";
    let limited_before = sample(&env, limited).await;
    for n in 0..3 {
        let (status, body) = env
            .proxy("noisy", "org-a", "noisy", "/api/v1/namespaces")
            .await;
        assert_eq!(status, 200, "request {n} is within the burst: {body}");
    }
    let url = format!(
        "{}/api/proxy/buildplane/noisy/org-a/noisy/k8s/api/v1/namespaces",
        env.base
    );
    let refused = env.http.get(&url).send().await.expect("answered");
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body = refused.text().await.unwrap();
    assert!(
        body.contains("PlaneRateLimited") && body.contains("noisy"),
        "{body}"
    );
    // The mark a sibling replica puts on a request it forwards buys a caller nothing: this
    // gateway has no siblings, so the request is counted (and refused) as any other.
    let forged = env
        .http
        .get(&url)
        .header("x-buildplane-forwarded-by", "gateway-1")
        .send()
        .await
        .expect("answered");
    assert_eq!(
        forged.status().as_u16(),
        429,
        "a caller's x-buildplane-forwarded-by skipped the rate limit"
    );
    assert_eq!(
        noisy.requests.load(Ordering::SeqCst),
        before + 3,
        "the refused requests never reached the agent"
    );
    let (status, body) = env
        .proxy("quiet", "org-b", "quiet", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 200, "the neighbour is served: {body}");
    assert_eq!(sample(&env, limited).await, limited_before + 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = env
        .proxy("noisy", "org-a", "noisy", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 200, "a token refilled: {body}");
}

/// `--plane-rate-request-bytes`: the bytes of an answer cost its planeID's tokens. At 5
/// requests a second, a burst of 5 and a token per KiB, one 200 KiB answer leaves the planeID
/// in debt (capped at one burst): its next request gets 429 with `Retry-After: 2` though it
/// sent one request, and the neighbour is served. (Before, a request cost one token whatever
/// it returned, and the second request was 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_cost_their_plane_more_than_one_request() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (env, _noisy, _quiet) = two_tenants(5, 5, Some(1024)).await;
    let big = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("big".into()),
            ..Default::default()
        },
        data: Some([("v".to_owned(), "x".repeat(200_000))].into()),
        ..ConfigMap::default()
    };
    kube::Api::<ConfigMap>::namespaced(env.build_cluster.client.clone(), "default")
        .create(&kube::api::PostParams::default(), &big)
        .await
        .expect("ConfigMap created");
    // Both buckets full again.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (status, body) = env
        .proxy(
            "noisy",
            "org-a",
            "noisy",
            "/api/v1/namespaces/default/configmaps/big",
        )
        .await;
    assert_eq!(status, 200, "within the burst");
    assert!(body.len() > 200_000, "{}", body.len());
    let url = format!(
        "{}/api/proxy/buildplane/noisy/org-a/noisy/k8s/api/v1/namespaces",
        env.base
    );
    let refused = env.http.get(&url).send().await.expect("answered");
    assert_eq!(
        refused.status().as_u16(),
        429,
        "the answer's bytes were charged"
    );
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2"),
        "one burst of debt and one token: 1.2 s"
    );
    let (status, body) = env
        .proxy("quiet", "org-b", "quiet", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 200, "the neighbour is served: {body}");
}
