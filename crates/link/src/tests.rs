//! Two links over an in-memory duplex socket with real WebSocket framing: requests, large
//! bodies under credits, concurrency, drains and lost connections as the shells see them.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use super::*;

fn config(role: Role) -> Config {
    Config {
        heartbeat_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        ..Config::new(role, buildplane_tunnel::version::V2)
    }
}

/// An agent that answers every request with a body of the size its path names (`/n`).
fn echo_agent() -> Acceptor {
    Box::new(|stream: StreamHandle| {
        tokio::spawn(async move {
            let Read::Request(head) = stream.read().await else {
                return;
            };
            let mut received = 0usize;
            loop {
                match stream.read().await {
                    Read::Data(bytes) => received += bytes.len(),
                    Read::End => break,
                    _ => return,
                }
            }
            let size: usize = head
                .path
                .trim_start_matches('/')
                .parse()
                .unwrap_or(received);
            stream
                .respond(
                    ResponseHead {
                        status: 200,
                        headers: vec![("x-received".into(), received.to_string())],
                    },
                    false,
                )
                .unwrap();
            if stream.write(Bytes::from(vec![b'a'; size])).await.is_ok() {
                let _ = stream.finish();
            }
        });
    })
}

async fn pair(acceptor: Acceptor) -> (Arc<Link>, Arc<Link>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let gateway_ws =
        WebSocketStream::from_raw_socket(a, WsRole::Server, Some(websocket_config())).await;
    let agent_ws =
        WebSocketStream::from_raw_socket(b, WsRole::Client, Some(websocket_config())).await;
    let gateway = Link::spawn(
        gateway_ws,
        Session::new(config(Role::Gateway), Moment::default()),
        None,
    );
    let agent = Link::spawn(
        agent_ws,
        Session::new(config(Role::Agent), Moment::default()),
        Some(acceptor),
    );
    (gateway, agent)
}

fn get(path: &str) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        target: "k8s".into(),
        path: path.into(),
        ..RequestHead::default()
    }
}

async fn body_of(stream: StreamHandle) -> Result<(ResponseHead, usize), String> {
    let Read::Response(head) = stream.read().await else {
        return Err("no head".into());
    };
    let mut body = stream.into_body();
    let mut n = 0;
    while let Some(chunk) = body.next().await {
        n += chunk.map_err(|e| e.to_string())?.len();
    }
    Ok((head, n))
}

/// Many concurrent requests, small and large, each gets its whole body back; afterwards neither
/// side holds a stream.
#[tokio::test]
async fn concurrent_requests_and_large_bodies_arrive_whole() {
    let (gateway, agent) = pair(echo_agent()).await;
    let sizes = [0usize, 1, 1024, 300 * 1024, 3 * 1024 * 1024];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let size = sizes[i % sizes.len()];
        let stream = gateway.open(get(&format!("/{size}")), true).unwrap();
        tasks.push(tokio::spawn(async move { (size, body_of(stream).await) }));
    }
    for task in tasks {
        let (size, result) = task.await.unwrap();
        let (head, n) = result.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(n, size);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gateway.open_streams(), 0);
    assert_eq!(agent.open_streams(), 0);
}

/// A request body larger than many windows streams to the agent under credits.
#[tokio::test]
async fn a_request_body_streams_under_credits() {
    let (gateway, _agent) = pair(echo_agent()).await;
    let stream = gateway.open(get("/0"), false).unwrap();
    let body = Bytes::from(vec![b'r'; 5 * 1024 * 1024 + 3]);
    stream.write(body).await.unwrap();
    stream.finish().unwrap();
    let (head, _) = body_of(stream).await.unwrap();
    assert_eq!(head.headers[0].1, (5 * 1024 * 1024 + 3).to_string());
}

/// Closing one side fails every stream in flight on the other at once, with `Lost`.
#[tokio::test]
async fn a_closed_link_fails_streams_in_flight_at_once() {
    let hang: Acceptor = Box::new(|stream: StreamHandle| {
        tokio::spawn(async move {
            let _ = stream.read().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        });
    });
    let (gateway, agent) = pair(hang).await;
    let stream = gateway.open(get("/"), true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.close("agent stopping");
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read())
        .await
        .expect("the caller learns at once");
    assert!(
        matches!(
            read,
            Read::Lost {
                before_head: true,
                ..
            }
        ),
        "{read:?}"
    );
    assert!(gateway.is_closed());
}

/// GoAway from the agent: the request in flight completes, new opens are refused, and both
/// links close afterwards.
#[tokio::test]
async fn go_away_lets_the_request_in_flight_finish() {
    let slow: Acceptor = Box::new(|stream: StreamHandle| {
        tokio::spawn(async move {
            let _ = stream.read().await;
            let _ = stream.read().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream
                .respond(
                    ResponseHead {
                        status: 200,
                        headers: vec![],
                    },
                    true,
                )
                .unwrap();
        });
    });
    let (gateway, agent) = pair(slow).await;
    let stream = gateway.open(get("/"), true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.go_away("renewal");
    tokio::time::timeout(Duration::from_secs(1), gateway.going_away())
        .await
        .unwrap();
    assert!(matches!(
        gateway.open(get("/"), true),
        Err(StreamError::Draining)
    ));
    let (head, _) = body_of(stream).await.unwrap();
    assert_eq!(head.status, 200);
    tokio::time::timeout(Duration::from_secs(2), agent.finished())
        .await
        .expect("the agent closes once drained");
    assert_eq!(agent.close_reason(), Some(CloseReason::Drained));
}

/// A caller that goes away resets its stream: the agent's writer learns it and stops.
#[tokio::test]
async fn a_dropped_caller_resets_the_stream_at_the_agent() {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let endless: Acceptor = Box::new(move |stream: StreamHandle| {
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let _ = stream.read().await;
            let _ = stream.read().await;
            stream
                .respond(
                    ResponseHead {
                        status: 200,
                        headers: vec![],
                    },
                    false,
                )
                .unwrap();
            let result = loop {
                if let Err(err) = stream.write(Bytes::from(vec![0u8; 64 * 1024])).await {
                    break err;
                }
            };
            if let Some(tx) = done_tx.lock().take() {
                let _ = tx.send(result);
            }
        });
    });
    let (gateway, _agent) = pair(endless).await;
    let stream = gateway.open(get("/watch"), true).unwrap();
    assert!(matches!(stream.read().await, Read::Response(_)));
    drop(stream);
    let err = tokio::time::timeout(Duration::from_secs(2), done_rx)
        .await
        .expect("the agent stops writing")
        .unwrap();
    assert!(matches!(err, StreamError::NotWritable(_)), "{err:?}");
    assert_eq!(gateway.open_streams(), 0);
}
