//! Our agent against a gateway that behaves as OpenChoreo v1.2.3's does on the wire (a 101 that
//! names no subprotocol, v1 JSON, stream messages for exec and Hubble), emulated here so these
//! run on every `cargo test`; `openchoreo_interop.rs` runs the same against the real binary.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use buildplane_pki::{Ca, ReloadableCert};
use common::{DAY, Env};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{Request, Response},
};

const WAIT: Duration = Duration::from_secs(10);

type ServerWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// A listener that upgrades every dial as gorilla's `Upgrader` without `Subprotocols` does: no
/// `Sec-WebSocket-Protocol` in the 101, whatever was offered. Each accepted socket comes out
/// with what the agent offered.
struct GorillaLike {
    url: String,
    accepted: tokio::sync::mpsc::Receiver<(ServerWs, Option<String>)>,
}

impl GorillaLike {
    async fn start(env: &Env) -> GorillaLike {
        let server = env
            .server_ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()], DAY)
            .unwrap();
        let cert = ReloadableCert::from_pem(&server.cert_pem, &server.key_pem).unwrap();
        let tls = buildplane_pki::agent_listener_config(cert).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "wss://127.0.0.1:{}/ws",
            listener.local_addr().unwrap().port()
        );
        let (tx, accepted) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = tokio_rustls::TlsAcceptor::from(tls.clone())
                    .accept(tcp)
                    .await
                else {
                    continue;
                };
                let offered = std::sync::Arc::new(parking_lot::Mutex::new(None));
                let seen = offered.clone();
                // The callback's error type is tungstenite's; its size is not ours to choose.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, res: Response| {
                    *seen.lock() = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    Ok(res)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await {
                    let offer = offered.lock().take();
                    let _ = tx.send((ws, offer)).await;
                }
            }
        });
        GorillaLike { url, accepted }
    }

    /// The next upgraded connection, and what its agent offered.
    async fn next(&mut self) -> (ServerWs, Option<String>) {
        tokio::time::timeout(WAIT, self.accepted.recv())
            .await
            .expect("a connection in time")
            .expect("the listener runs")
    }
}

/// The next text message from the agent, as JSON.
async fn next_text(ws: &mut ServerWs) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("a message");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The golden OpenChoreo v1.2.3 message `name` of the tunnel crate.
fn golden(name: &str) -> String {
    let path = format!(
        "{}/../tunnel/test_data/openchoreo-v1.2.3/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim_end()
        .to_owned()
}

/// With its default settings our agent offers v2 and v1; on a connection whose 101 names no
/// subprotocol (OpenChoreo's gateway) it speaks v1: it answers OpenChoreo's requests there, on
/// its first and only connection. With `--protocol v1` nothing is offered at all.
/// (Before, the WebSocket client refused such a 101, "server sent no subprotocol", and the
/// agent redialled forever; later it closed that connection and dialled again offering
/// nothing, which left OpenChoreo's gateway without an agent for a moment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_speaks_v1_when_the_offer_is_ignored() {
    let mut env = Env::start().await;
    let mut gateway = GorillaLike::start(&env).await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let leaf = ca.issue_client("p", DAY).unwrap();
    let server_ca = env.server_ca.cert_pem().to_owned();
    let agent = env.agent_to(&gateway.url, &server_ca, &leaf, "p", "workflowplane", 2);
    let (mut ws, offer) = gateway.next().await;
    assert_eq!(
        offer.as_deref(),
        Some("buildplane.tunnel.v2, buildplane.tunnel.v1")
    );
    ws.send(Message::text(golden("gateway-request-get")))
        .await
        .unwrap();
    let answer = next_text(&mut ws).await;
    assert_eq!(answer["requestID"], "6f1c2a9e-3d8b-4f3e-9a51-2b7c0d4e8f10");
    assert_eq!(answer["statusCode"], 200, "{answer}");
    assert!(agent.is_connected());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), gateway.accepted.recv())
            .await
            .is_err(),
        "no second connection"
    );

    let explicit = env.agent_to(&gateway.url, &server_ca, &leaf, "p", "workflowplane", 1);
    let (_, offer) = gateway.next().await;
    assert_eq!(offer, None, "--protocol v1 offers nothing");
    env.eventually("the v1 agent connected", WAIT, || async {
        explicit.is_connected()
    })
    .await;
}

/// OpenChoreo's exec and Hubble stream openings are never run as requests: our agent answers
/// each with a closing chunk carrying its reason (OpenChoreo's agent's answer when it cannot
/// serve one), skips the chunks that follow and counts them, and keeps serving; a target it does
/// not serve gets OpenChoreo's own error: `statusCode` 404, `error: {code: 404, message:
/// "unknown target: <t>"}`, no body.
/// (Before, the exec opening ran as a POST to `/exec` and the unknown target got a JSON body.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_answers_openchoreos_stream_messages_and_errors() {
    let mut env = Env::start().await;
    let mut gateway = GorillaLike::start(&env).await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let leaf = ca.issue_client("p", DAY).unwrap();
    let server_ca = env.server_ca.cert_pem().to_owned();
    let agent = env.agent_to(&gateway.url, &server_ca, &leaf, "p", "workflowplane", 1);
    let (mut ws, _) = gateway.next().await;

    for init in ["gateway-stream-init-exec", "gateway-stream-init-hubble"] {
        ws.send(Message::text(golden(init))).await.unwrap();
        let answer = next_text(&mut ws).await;
        assert_eq!(
            answer["requestID"], "gw-5a1b2c3d4e5f6a7b",
            "{init}: {answer}"
        );
        assert_eq!(answer["isClose"], true, "{init}: {answer}");
        assert!(answer.get("statusCode").is_none(), "{init}: {answer}");
        let reason = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            answer["data"].as_str().expect("data"),
        )
        .unwrap();
        assert!(
            String::from_utf8_lossy(&reason).contains("not supported by this cluster agent"),
            "{init}: {answer}"
        );
    }
    for chunk in ["gateway-stream-chunk-stdin", "gateway-stream-chunk-close"] {
        ws.send(Message::text(golden(chunk))).await.unwrap();
    }

    let unknown = golden("gateway-request-get").replace(r#""target":"k8s""#, r#""target":"logs""#);
    ws.send(Message::text(unknown)).await.unwrap();
    let answer = next_text(&mut ws).await;
    assert_eq!(
        answer,
        serde_json::from_str::<Value>(&golden("agent-error-unknown-target")).unwrap(),
        "OpenChoreo's own answer, field for field"
    );

    ws.send(Message::text(golden("gateway-request-get")))
        .await
        .unwrap();
    let answer = next_text(&mut ws).await;
    assert_eq!(answer["statusCode"], 200, "{answer}");
    assert_eq!(agent.ignored.load(Ordering::Relaxed), 4);
    assert!(
        agent
            .metrics_text()
            .contains("cluster_agent_ignored_messages_total 4")
    );
    assert!(agent.is_connected());
}
