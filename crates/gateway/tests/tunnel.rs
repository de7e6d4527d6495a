//! Proxied requests through real agents: watch streaming, v1 and v2 side by side, an agent
//! dying mid-request, per-stream flow control, gateway restart, the event stream.

mod common;

use std::time::Duration;

use buildplane_pki::Ca;
use buildplane_tunnel::v2::{self, Frame, Limits};
use common::{DAY, Env, V2_FIRST};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

async fn build_namespace(env: &Env, name: &str) {
    let api: Api<Namespace> = Api::all(env.build_cluster.client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = api.create(&PostParams::default(), &ns).await;
}

async fn config_map(env: &Env, ns: &str, name: &str, size: usize) {
    let api: Api<ConfigMap> = Api::namespaced(env.build_cluster.client.clone(), ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([("blob".to_owned(), "x".repeat(size))].into()),
        ..ConfigMap::default()
    };
    api.create(&PostParams::default(), &cm)
        .await
        .expect("ConfigMap created");
}

/// A watch through the tunnel streams events as they happen (OpenChoreo answers 501): the
/// response head arrives first, then the ADDED event for an object created afterwards.
/// (Fails if the agent buffered the body: the read would time out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_through_the_tunnel() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    build_namespace(&env, "work").await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;

    let res = env
        .http
        .get(format!(
            "{}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces/work/configmaps?watch=true",
            env.base
        ))
        .send()
        .await
        .expect("watch started");
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    config_map(&env, "work", "streamed", 10).await;
    let mut seen = String::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
            if seen.contains("ADDED") && seen.contains("streamed") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "the ADDED event arrived while the watch was open; got {seen:?}"
    );
}

/// A small answer (its head, body and end in one message) reaches the caller with its
/// Content-Length, as from the API server itself, not as a chunked body; a large one streams.
/// Both arrive whole, over v2 and over v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_answer_has_its_length_and_a_large_one_streams_whole() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "new", "p-v2", ca.cert_pem()).await;
    env.build_plane("org-a", "old", "p-v1", ca.cert_pem()).await;
    build_namespace(&env, "work").await;
    config_map(&env, "work", "small", 100).await;
    config_map(&env, "work", "large", 600 * 1024).await;
    let _v2 = env.agent(&ca, "p-v2", 2);
    let _v1 = env.agent(&ca, "p-v1", 1);
    for (plane, name) in [("p-v2", "new"), ("p-v1", "old")] {
        env.wait_proxy_status(plane, "org-a", name, 200, WAIT).await;
        for (object, size) in [("small", 100), ("large", 600 * 1024)] {
            let res = env
                .http
                .get(format!(
                    "{}/api/proxy/buildplane/{plane}/org-a/{name}/k8s/api/v1/namespaces/work/configmaps/{object}",
                    env.base
                ))
                .send()
                .await
                .expect("answered");
            assert_eq!(res.status(), 200, "{plane} {object}");
            let header = |name: &str| {
                res.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let (length, encoding) = (header("content-length"), header("transfer-encoding"));
            let body = res.bytes().await.expect("the whole body");
            let object: ConfigMap = serde_json::from_slice(&body).expect("a ConfigMap");
            assert_eq!(object.data.unwrap()["blob"].len(), size, "{plane}");
            if size == 100 {
                assert_eq!(
                    length,
                    Some(body.len().to_string()),
                    "{plane}: a small answer has its length"
                );
                assert_eq!(encoding, None, "{plane}: and is not chunked");
            }
        }
    }
}

/// A v1 (OpenChoreo JSON) agent and a v2 agent serve side by side; the table shows their
/// protocols; a watch to the v1 agent is refused with 501, to the v2 agent it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_agents_side_by_side() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "old", "p-v1", ca.cert_pem()).await;
    env.build_plane("org-a", "new", "p-v2", ca.cert_pem()).await;
    let _v1 = env.agent(&ca, "p-v1", 1);
    let _v2 = env.agent(&ca, "p-v2", 2);
    env.wait_proxy_status("p-v1", "org-a", "old", 200, WAIT)
        .await;
    env.wait_proxy_status("p-v2", "org-a", "new", 200, WAIT)
        .await;
    let (_, body) = env
        .proxy("p-v1", "org-a", "old", "/api/v1/namespaces/kube-system")
        .await;
    assert!(body.contains("kube-system"), "{body}");
    let table: serde_json::Value =
        serde_json::from_str(&env.get("/api/v1/connections").await.1).unwrap();
    let mut protocols: Vec<u64> = table["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["protocol"].as_u64().unwrap())
        .collect();
    protocols.sort();
    assert_eq!(protocols, [1, 2]);
    let (status, body) = env
        .proxy("p-v1", "org-a", "old", "/api/v1/configmaps?watch=true")
        .await;
    assert_eq!(status, 501, "{body}");
    // A POST with a body through v1 (base64 JSON) reaches the build cluster.
    let res = env
        .http
        .post(format!(
            "{}/api/proxy/buildplane/p-v1/org-a/old/k8s/api/v1/namespaces",
            env.base
        ))
        .header("content-type", "application/json")
        .body(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"made-by-v1"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let (status, _) = env
        .proxy("p-v2", "org-a", "new", "/api/v1/namespaces/made-by-v1")
        .await;
    assert_eq!(status, 200);
    // A target the v1 agent does not serve: OpenChoreo's 404 and message, through the error
    // object of the v1 answer.
    let (status, body) = env
        .get("/api/proxy/buildplane/p-v1/org-a/old/monitoring/api/v1/query")
        .await;
    assert_eq!(status, 404, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["message"], "unknown target: monitoring", "{body}");
}

/// Reads the next text message of a raw v1 agent: the tunnel request.
async fn next_v1_request(ws: &mut common::Ws) -> serde_json::Value {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the gateway sent the request within 10 s");
        match next.expect("open").expect("a message") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A v1 agent (OpenChoreo's kind: no subprotocol) that sends what the gateway cannot use (not
/// JSON, a stream chunk, a response for no request) keeps its connection: each is counted in
/// `cluster_gateway_ignored_messages_total` and skipped; an error whose `details` is an object
/// (OpenChoreo's type) reaches the caller; an answer over the v1 limit (~12 MiB of body) fails
/// its own request with 502 while the next is answered on the same connection.
/// (Before, each of these closed the connection and failed every request on it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_agent_message_the_gateway_cannot_use_fails_nothing_else() {
    // Hung once in CI for over two hours (every socket idle): its first request raced the
    // gateway's registration of the raw agent (answered 503, never sent to it) while the test
    // waited for it on the socket. `raw_admitted` now waits for the registration; a wait that
    // still goes wrong fails here instead of hanging.
    tokio::time::timeout(
        Duration::from_secs(120),
        v1_agent_message_the_gateway_cannot_use(),
    )
    .await
    .expect("the test finished within 120 s (a hang was seen once; see the session note)");
}

async fn v1_agent_message_the_gateway_cannot_use() {
    let env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let leaf = ca.issue_client("p", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let (mut ws, protocol) = env
        .raw_admitted("?planeID=p&planeType=workflowplane", &leaf, None)
        .await;
    assert_eq!(protocol, None, "no subprotocol offered, none named");
    let url = |path: &str| format!("{}/api/proxy/workflowplane/p/org-a/bp/k8s{path}", env.base);

    let caller = tokio::spawn(env.http.get(url("/api/v1/namespaces/a")).send());
    let request = next_v1_request(&mut ws).await;
    let id = request["requestID"].as_str().unwrap().to_owned();
    for junk in [
        "not json".to_owned(),
        r#"{"requestID":"x","data":"AQ==","streamId":1}"#.to_owned(),
        r#"{"requestID":"nobody","statusCode":200}"#.to_owned(),
    ] {
        ws.send(Message::text(junk)).await.unwrap();
    }
    let answer = format!(
        r#"{{"requestID":"{id}","statusCode":500,"error":{{"code":500,"message":"backend failed","details":{{"attempts":2}}}}}}"#
    );
    ws.send(Message::text(answer)).await.unwrap();
    let res = caller.await.unwrap().unwrap();
    assert_eq!(res.status(), 500);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["details"]["attempts"], 2, "{body}");

    let huge_caller = tokio::spawn(env.http.get(url("/api/v1/configmaps")).send());
    let huge_id = next_v1_request(&mut ws).await["requestID"]
        .as_str()
        .unwrap()
        .to_owned();
    let small_caller = tokio::spawn(env.http.get(url("/api/v1/namespaces/b")).send());
    let small_id = next_v1_request(&mut ws).await["requestID"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = "A".repeat(20 * 1024 * 1024);
    ws.send(Message::text(format!(
        r#"{{"requestID":"{huge_id}","statusCode":200,"body":"{body}"}}"#
    )))
    .await
    .unwrap();
    ws.send(Message::text(format!(
        r#"{{"requestID":"{small_id}","statusCode":200,"body":"e30="}}"#
    )))
    .await
    .unwrap();
    let huge = huge_caller.await.unwrap().unwrap();
    assert_eq!(huge.status(), 502);
    assert!(huge.text().await.unwrap().contains("too large"));
    let small = small_caller.await.unwrap().unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(small.text().await.unwrap(), "{}");

    assert_eq!(env.connections().await, 1, "the same connection throughout");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("cluster_gateway_ignored_messages_total 3"),
        "the two undecodable messages and the oversized answer (an answer to no request in flight is dropped quietly: its caller went away): {metrics}"
    );
}

/// An agent whose connection dies while a request is in flight (the process killed: its socket
/// closes) fails that request at once with 502 and a body that says so, not after a timeout.
/// (Fails with OpenChoreo's behaviour: the caller waits for the 30 s response timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_request_fails_the_caller_at_once() {
    let env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    // The reflector sees the new BuildPlane shortly after it is applied.
    let (mut ws, protocol) = env
        .raw_admitted("?planeID=p&planeType=buildplane", &leaf, Some(V2_FIRST))
        .await;
    assert_eq!(protocol.as_deref(), Some("buildplane.tunnel.v2"));
    env.eventually("the fake agent is registered", WAIT, || async {
        env.connections().await == 1
    })
    .await;
    let caller = {
        let http = env.http.clone();
        let url = format!(
            "{}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces",
            env.base
        );
        tokio::spawn(async move {
            let res = http.get(url).send().await.expect("answered");
            (res.status().as_u16(), res.text().await.unwrap_or_default())
        })
    };
    // Wait for the request to reach the "agent", then die without answering.
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("request arrives")
            .expect("open")
            .expect("frame");
        if let Message::Binary(bytes) = message
            && matches!(
                v2::decode(&bytes, Limits::with_max_frame(1 << 20)),
                Ok(Frame::RequestHead { .. })
            )
        {
            break;
        }
    }
    let killed = tokio::time::Instant::now();
    drop(ws);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), caller)
        .await
        .expect("the caller is answered within 5 s (the code targets well under 1 s)")
        .unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("AgentConnectionClosed"), "{body}");
    assert!(killed.elapsed() < Duration::from_secs(5));
}

/// Per-stream flow control: a caller that does not read a large response holds back only its
/// own stream; other requests on the same connection are answered, and the held stream is
/// complete when finally read. (Fails if the agent ignored the window: the gateway resets the
/// overrunning stream and the body errors; fails if the reader blocked: the second GET hangs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_caller_does_not_stall_other_streams() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    build_namespace(&env, "big").await;
    // 8 MiB: more than loopback socket buffers absorb, so the window really fills.
    for i in 0..64 {
        config_map(&env, "big", &format!("cm-{i}"), 128 * 1024).await;
    }
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
    let slow = env
        .http
        .get(format!(
            "{}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces/big/configmaps",
            env.base
        ))
        .send()
        .await
        .expect("head");
    assert_eq!(slow.status(), 200);
    // Do not read `slow` for a while; meanwhile other requests flow.
    for _ in 0..5 {
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(5),
            env.proxy("p", "org-a", "bp", "/api/v1/namespaces/big"),
        )
        .await
        .expect("not stalled behind the slow stream");
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = slow.bytes().await.expect("the held stream completes");
    assert!(body.len() > 64 * 128 * 1024, "{} bytes", body.len());
    let list: serde_json::Value = serde_json::from_slice(&body).expect("a whole JSON list");
    assert_eq!(list["items"].as_array().unwrap().len(), 64);
}

/// The gateway restarts on the same ports: its agents come back on their own (backoff with
/// jitter) and requests succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_come_back_after_a_gateway_restart() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let agents: Vec<_> = (0..3).map(|_| env.agent(&ca, "p", 2)).collect();
    env.eventually("three agents connected", WAIT, || async {
        env.connected_agents("p", None).await == 3
    })
    .await;
    env.stop_gateway().await;
    env.eventually("agents noticed", WAIT, || async {
        agents.iter().all(|a| !a.is_connected())
    })
    .await;
    env.start_gateway().await;
    env.eventually("three agents back", Duration::from_secs(20), || async {
        env.connected_agents("p", None).await == 3
    })
    .await;
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
}

/// An agent whose connection the gateway drains (a restart) is back within seconds, however far
/// it had backed off before: its admission forgets the refusals and failed dials before it, and
/// a drained connection (an orderly goodbye, however short its life) starts the backoff again.
/// Chaos found both on the real API servers. Seed 2026: an agent that had failed five dials met
/// a graceful gateway restart 2.4 s into its next connection and came back 14.4 s later (the
/// drain ended the connection before the agent acted on the GoAway, so the end counted as a
/// flap). Seed 2027: an agent refused twice at registration (a 30 s ceiling) lost its gateway
/// to a kill 7 s into its first connection and waited 14.6 s. Here the agent starts backed off
/// to its 30 s cap; seen failing 2 of 3 with neither rule (each rule alone brings it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_comes_back_at_once_whatever_it_backed_off_before() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    // The agent starts backed off: its first dial must not meet a gateway that has not seen
    // the BuildPlane yet.
    env.eventually("the gateway admits the leaf", WAIT, || async {
        env.raw_connect("?planeID=p&planeType=buildplane", Some(&leaf), None)
            .await
            .is_ok()
    })
    .await;
    let mut config = cluster_agent::AgentConfig::new(env.agent_url(), "p");
    config.ping_interval = Duration::from_secs(1);
    config.read_deadline = Duration::from_secs(5);
    config.backoff =
        cluster_agent::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    config.backoff.penalize(10);
    let server_ca = env.server_ca.cert_pem().to_owned();
    let _agent = env.agent_as_configured(config, &server_ca, &leaf);
    env.eventually("the agent connected", WAIT, || async {
        env.connected_agents("p", None).await == 1
    })
    .await;
    env.stop_gateway().await;
    env.start_gateway().await;
    env.eventually(
        "the agent back within 5 s of the restart",
        Duration::from_secs(5),
        || async { env.connected_agents("p", None).await == 1 },
    )
    .await;
}

/// `/api/v1/events` starts with a snapshot, then reports connect, authorisation changes and
/// disconnect with per-CR agent counts (what the controller turns into status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_reports_snapshot_then_changes() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let other = Ca::generate("other-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    env.build_plane("org-b", "bp", "p", other.cert_pem()).await;
    let res = env
        .http
        .get(format!("{}/api/v1/events", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut lines = res.bytes_stream();
    let mut buffer = String::new();
    let mut next_event = async || -> serde_json::Value {
        loop {
            if let Some(i) = buffer.find('\n') {
                let line: String = buffer.drain(..=i).collect();
                if line.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(&line).expect("one JSON object per line");
            }
            let chunk = tokio::time::timeout(WAIT, lines.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("chunk");
            buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let snapshot = next_event().await;
    assert_eq!(snapshot["type"], "snapshot");
    let _agent = env.agent(&ca, "p", 2);
    let connected = next_event().await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["planeID"], "p");
    assert_eq!(connected["crs"], serde_json::json!(["org-a/bp"]));
    assert_eq!(connected["connectedAgentsByCr"]["org-a/bp"], 1);
    env.build_plane("org-b", "bp", "p", ca.cert_pem()).await;
    let authorized = next_event().await;
    assert_eq!(authorized["type"], "authorized", "{authorized}");
    assert_eq!(authorized["crs"], serde_json::json!(["org-b/bp"]));
    env.build_plane("org-a", "bp", "p", other.cert_pem()).await;
    let revoked = next_event().await;
    assert_eq!(revoked["type"], "revoked", "{revoked}");
    assert_eq!(revoked["connectedAgentsByCr"]["org-a/bp"], 0);
    env.stop_agents();
    let disconnected = next_event().await;
    assert_eq!(disconnected["type"], "disconnected", "{disconnected}");
    assert_eq!(disconnected["connectedAgentsByCr"]["org-b/bp"], 0);
}

/// OpenChoreo's validator, before anything reaches an agent: disallowed method 405, blocked
/// Secret paths 403, `..` 400, over 10 MiB 413, connection upgrades 501; a target the agent
/// does not serve is answered 404 by the agent; `reconnect` drops the plane's agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_validation_matches_openchoreo() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
    let base = format!("{}/api/proxy/buildplane/p/org-a/bp", env.base);
    let status = |res: reqwest::Response| res.status().as_u16();
    let trace = env
        .http
        .request(
            reqwest::Method::TRACE,
            format!("{base}/k8s/api/v1/namespaces"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(status(trace), 405);
    for blocked in [
        "/k8s/api/v1/secrets",
        "/k8s/api/v1/namespaces/kube-system/secrets/x",
    ] {
        let (code, body) = env
            .get(&format!("/api/proxy/buildplane/p/org-a/bp{blocked}"))
            .await;
        assert_eq!(code, 403, "{blocked}: {body}");
    }
    let (code, _) = env
        .get("/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces/a..b/pods")
        .await;
    assert_eq!(code, 400);
    // A head the tunnel cannot carry whole (a string over 64 KiB) is refused, never cut.
    // (HTTP/1.1: HTTP/2 callers are held to 16 KiB of headers before they reach the proxy.)
    let long = env
        .http1
        .get(format!("{base}/k8s/api/v1/namespaces"))
        .header("x-annotation", "a".repeat(70_000))
        .send()
        .await
        .unwrap();
    assert_eq!(status(long), 431);
    let big = env
        .http
        .post(format!("{base}/k8s/api/v1/namespaces"))
        .body(vec![b' '; 10 * 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(status(big), 413);
    let upgrade = env
        .http1
        .get(format!("{base}/k8s/api/v1/namespaces/x/pods/y/exec"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(status(upgrade), 501);
    let (code, body) = env
        .get("/api/proxy/buildplane/p/org-a/bp/monitoring/api/v1/query")
        .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown target: monitoring"), "{body}");
    let (code, _) = env.get("/api/proxy/buildplane/p/org-a/bp/shell/x").await;
    assert_eq!(code, 400);

    let res = env
        .http
        .post(format!("{}/api/v1/planes/buildplane/p/reconnect", env.base))
        .send()
        .await
        .unwrap();
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["disconnectedAgents"], 1, "{answer}");
    // The agent comes back by itself.
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
}

/// Heartbeats: an agent that stops answering (a partition: the socket stays open, nothing comes
/// back) is dropped after `--heartbeat-timeout`, and the plane reports no agent (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_dropped_after_the_heartbeat_timeout() {
    let mut env = Env::start().await;
    env.stop_gateway().await;
    env.config.heartbeat_interval = Duration::from_millis(300);
    env.config.heartbeat_timeout = Duration::from_secs(1);
    env.start_gateway().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Connected, then silent: never read (so never pong) and never write.
    let _silent = loop {
        match env
            .raw_connect(
                "?planeID=p&planeType=buildplane",
                Some(&leaf),
                Some(V2_FIRST),
            )
            .await
        {
            Ok(ws) => break ws,
            Err(err) if tokio::time::Instant::now() > deadline => panic!("not admitted: {err:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    env.eventually("registered", WAIT, || async {
        env.connections().await == 1
    })
    .await;
    env.eventually("dropped by the heartbeat timeout", WAIT, || async {
        env.connections().await == 0
    })
    .await;
    let (status, _) = env.proxy("p", "org-a", "bp", "/api/v1/namespaces").await;
    assert_eq!(status, 503);
}

/// An agent that resets a stream before answering passes its code on: 503 (at its request
/// limit) with `Retry-After`, 400 and 502 as they are, anything outside 4xx/5xx as 502. (Seen
/// to fail before: every reset was a 502, so callers could not tell "busy, retry" from "failed".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reset_gives_the_caller_its_status() {
    let env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    let leaf = ca.issue_client("p", DAY).unwrap();
    let (mut ws, _) = env
        .raw_admitted("?planeID=p&planeType=buildplane", &leaf, Some(V2_FIRST))
        .await;
    env.eventually("the fake agent is registered", WAIT, || async {
        env.connections().await == 1
    })
    .await;
    for (code, expected) in [(503, 503), (400, 400), (502, 502), (999, 502), (200, 502)] {
        let caller = {
            let http = env.http.clone();
            let url = format!(
                "{}/api/proxy/buildplane/p/org-a/bp/k8s/api/v1/namespaces",
                env.base
            );
            tokio::spawn(async move {
                let res = http.get(url).send().await.expect("answered");
                let retry_after = res
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                (
                    res.status().as_u16(),
                    retry_after,
                    res.text().await.unwrap_or_default(),
                )
            })
        };
        let stream = loop {
            let message = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("request arrives")
                .expect("open")
                .expect("frame");
            if let Message::Binary(bytes) = message
                && let Ok(Frame::RequestHead { stream, .. }) =
                    v2::decode(&bytes, Limits::with_max_frame(1 << 20))
            {
                break stream;
            }
        };
        let reset = Frame::Reset {
            stream,
            code,
            reason: "the agent is at its request limit; retry later".into(),
        };
        ws.send(Message::Binary(v2::to_vec(&reset).into()))
            .await
            .expect("reset sent");
        let (status, retry_after, body) = tokio::time::timeout(WAIT, caller)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(status, expected, "reset code {code}: {body}");
        assert!(
            body.contains("AgentError") && body.contains(&format!("({code})")),
            "{body}"
        );
        assert_eq!(
            retry_after.as_deref(),
            (expected == 503).then_some("1"),
            "reset code {code}"
        );
    }
}

/// A 10 MiB body (the proxy's limit) crosses the tunnel whole, over v1 and v2, and the caller
/// gets the build cluster's own answer: kube-sim's 413 `RequestEntityTooLarge` (its limit is
/// 3 MiB, as the real API server's), every time.
/// (Failed about four times in five when kube-sim stopped reading at its limit: the agent's
/// upload was cut and the caller got 502.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mib_body_reaches_the_build_cluster() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    for (plane, protocol) in [("p-v1", 1), ("p-v2", 2)] {
        env.build_plane("org-a", plane, plane, ca.cert_pem()).await;
        let _agent = env.agent(&ca, plane, protocol);
        env.wait_proxy_status(plane, "org-a", plane, 200, WAIT)
            .await;
        for _ in 0..5 {
            let res = env
                .http
                .post(format!(
                    "{}/api/proxy/buildplane/{plane}/org-a/{plane}/k8s/api/v1/namespaces/default/configmaps",
                    env.base
                ))
                .header("content-type", "application/json")
                .body(vec![b' '; 10 * 1024 * 1024])
                .send()
                .await
                .unwrap();
            let status = res.status();
            let body = res.text().await.unwrap();
            assert_eq!(status, 413, "{plane}: {body}");
            assert!(body.contains("RequestEntityTooLarge"), "{plane}: {body}");
        }
    }
}
