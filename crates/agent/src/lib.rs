//! The cluster agent: owns its identity, dials the gateway over WebSocket with mutual TLS, runs
//! the Kubernetes requests the control plane sends against its local API server, and reconnects
//! with exponential backoff and full jitter.

pub mod backoff;
pub mod identity;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use buildplane_pki::ReloadableCert;
use buildplane_tunnel::{
    SUBPROTOCOL_V1, SUBPROTOCOL_V2, v1,
    v2::{self, Frame, Limits},
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use kube::Client;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `wss://host:port/ws`.
    pub server_url: String,
    /// The planeID this agent serves.
    pub plane_id: String,
    /// `buildplane`.
    pub plane_type: String,
    /// Kubeconfig of the build cluster (in-cluster when `None`).
    pub kubeconfig: Option<PathBuf>,
    /// The gateway's serving CA (PEM file).
    pub server_ca: PathBuf,
    /// Namespace of the identity Secrets.
    pub identity_namespace: String,
    /// Validity of a client leaf.
    pub leaf_validity: Duration,
    /// Renew the leaf this long before it expires.
    pub renew_before: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// `2` (binary, streaming) or `1` (OpenChoreo JSON).
    pub protocol: u16,
    /// Health listener.
    pub health_listen: Option<SocketAddr>,
    /// Requests run at once; more wait.
    pub max_concurrent_requests: usize,
    /// This process's instance id: a reconnect with the same certificate and id replaces the
    /// older connection at the gateway; HA replicas sharing a certificate differ by it.
    pub agent_id: String,
}

/// Builds a client for the kubeconfig or the in-cluster configuration.
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Why a connection attempt or session ended.
enum Ended {
    /// The gateway refused the upgrade with this status (and Retry-After seconds).
    Refused(u16, Option<u64>, String),
    /// The connection failed or closed after `lived`.
    Closed(Duration, String),
    /// The certificate was renewed: reconnect at once.
    Renewed,
}

/// Runs the agent until the process ends.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    buildplane_pki::install_crypto_provider();
    let client = kube_client(config.kubeconfig.as_ref()).await?;
    let identity = identity::ensure(
        &client,
        &config.identity_namespace,
        &config.plane_id,
        config.leaf_validity,
        config.renew_before,
    )
    .await?;
    let cert = ReloadableCert::from_pem(&identity.leaf.cert_pem, &identity.leaf.key_pem)?;
    let server_ca = std::fs::read(&config.server_ca)
        .with_context(|| format!("reading the gateway CA {}", config.server_ca.display()))?;
    let tls = buildplane_pki::client_config(&server_ca, Some(cert.clone()))?;
    let connected = Arc::new(AtomicBool::new(false));
    if let Some(listen) = config.health_listen {
        tokio::spawn(health(listen, connected.clone()));
    }
    let renewed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(renew_loop(
        client.clone(),
        config.clone(),
        cert.clone(),
        renewed.clone(),
    ));
    let limit = Arc::new(Semaphore::new(config.max_concurrent_requests.max(1)));
    let mut backoff = config.backoff.clone();
    loop {
        let ended = session(&config, &client, tls.clone(), &connected, &renewed, &limit).await;
        connected.store(false, Ordering::SeqCst);
        let delay = match ended {
            Ended::Renewed => {
                info!("reconnecting with the renewed certificate");
                continue;
            }
            Ended::Refused(status, retry_after, body) => {
                warn!(status, %body, "the gateway refused the connection");
                let delay = if status == 401 || status == 403 {
                    backoff.cap
                } else {
                    backoff.next_delay()
                };
                retry_after.map_or(delay, |s| delay.max(Duration::from_secs(s)))
            }
            Ended::Closed(lived, reason) => {
                if lived >= backoff.reset_after {
                    backoff.reset();
                }
                info!(%reason, lived_ms = lived.as_millis() as u64, "connection ended");
                backoff.next_delay()
            }
        };
        debug!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::time::sleep(delay).await;
    }
}

async fn renew_loop(
    client: Client,
    config: AgentConfig,
    cert: Arc<ReloadableCert>,
    renewed: Arc<tokio::sync::Notify>,
) {
    loop {
        let check_every =
            (config.renew_before / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
        tokio::time::sleep(check_every).await;
        match identity::ensure(
            &client,
            &config.identity_namespace,
            &config.plane_id,
            config.leaf_validity,
            config.renew_before,
        )
        .await
        {
            Ok(identity) => {
                let current = cert.leaf();
                let fresh = buildplane_pki::parse_cert_bundle(identity.leaf.cert_pem.as_bytes())
                    .ok()
                    .map(|c| c[0].clone());
                if fresh.is_some_and(|fresh| fresh != current) {
                    if let Err(err) =
                        cert.replace_from_pem(&identity.leaf.cert_pem, &identity.leaf.key_pem)
                    {
                        warn!(%err, "could not load the renewed certificate");
                        continue;
                    }
                    info!("client certificate renewed");
                    renewed.notify_one();
                }
            }
            Err(err) => warn!(%err, "certificate renewal check failed"),
        }
    }
}

async fn session(
    config: &AgentConfig,
    client: &Client,
    tls: Arc<rustls::ClientConfig>,
    connected: &AtomicBool,
    renewed: &tokio::sync::Notify,
    limit: &Arc<Semaphore>,
) -> Ended {
    let url = format!(
        "{}?planeID={}&planeType={}&agentID={}",
        config.server_url, config.plane_id, config.plane_type, config.agent_id
    );
    let mut request = match url.as_str().into_client_request() {
        Ok(request) => request,
        Err(err) => {
            return Ended::Closed(Duration::ZERO, format!("invalid server URL {url}: {err}"));
        }
    };
    let offer = if config.protocol >= 2 {
        format!("{SUBPROTOCOL_V2}, {SUBPROTOCOL_V1}")
    } else {
        SUBPROTOCOL_V1.to_owned()
    };
    if let Ok(value) = HeaderValue::from_str(&offer) {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", value);
    }
    let host = request.uri().host().unwrap_or("localhost").to_owned();
    let port = request.uri().port_u16().unwrap_or(443);
    let started = tokio::time::Instant::now();
    let tcp = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Ended::Closed(Duration::ZERO, format!("connect: {err}")),
        Err(_) => return Ended::Closed(Duration::ZERO, "connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(host.clone()) else {
        return Ended::Closed(Duration::ZERO, format!("invalid server name {host}"));
    };
    let tls_stream = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Ended::Closed(Duration::ZERO, format!("TLS: {err}")),
        Err(_) => return Ended::Closed(Duration::ZERO, "TLS handshake timed out".into()),
    };
    let (ws, response) = match tokio_tungstenite::client_async(request, tls_stream).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Ended::Refused(status, retry_after, body);
        }
        Err(err) => return Ended::Closed(Duration::ZERO, format!("upgrade: {err}")),
    };
    let version = match response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
    {
        Some(SUBPROTOCOL_V2) => 2,
        _ => 1,
    };
    info!(plane_id = %config.plane_id, protocol = version, "connected to the gateway");
    connected.store(true, Ordering::SeqCst);
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
    });
    if version >= 2 {
        let hello = Frame::Hello {
            version: 2,
            plane_id: config.plane_id.clone(),
        };
        let _ = out_tx
            .send(Message::Binary(Bytes::from(v2::to_vec(&hello))))
            .await;
    }
    let mut bodies: HashMap<u32, (Frame, Vec<u8>)> = HashMap::new();
    let mut tasks: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    ping.tick().await;
    let read_deadline = Duration::from_secs(45);
    let mut last_heard = tokio::time::Instant::now();
    let ended = loop {
        tokio::select! {
            () = renewed.notified() => break Ended::Renewed,
            _ = ping.tick() => {
                if last_heard.elapsed() > read_deadline {
                    break Ended::Closed(started.elapsed(), "gateway silent past the read deadline".into());
                }
                let message = if version >= 2 { Message::Binary(Bytes::from(v2::to_vec(&Frame::Ping { nonce: 0 }))) } else { Message::Ping(Bytes::new()) };
                let _ = out_tx.send(message).await;
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => break Ended::Closed(started.elapsed(), err.to_string()),
                    None => break Ended::Closed(started.elapsed(), "closed by the gateway".into()),
                };
                last_heard = tokio::time::Instant::now();
                match message {
                    Message::Binary(bytes) => {
                        let frame = match v2::decode(&bytes, Limits { max_frame: 16 * 1024 * 1024 }) {
                            Ok(frame) => frame,
                            Err(err) => break Ended::Closed(started.elapsed(), format!("malformed frame: {err}")),
                        };
                        match frame {
                            Frame::RequestHead { stream, end_stream, .. } if end_stream => {
                                tasks.retain(|_, t| !t.is_finished());
                                tasks.insert(stream, spawn_v2(client.clone(), limit.clone(), frame, Vec::new(), out_tx.clone()));
                            }
                            Frame::RequestHead { stream, .. } => { bodies.insert(stream, (frame, Vec::new())); }
                            Frame::Data { stream, chunk } => {
                                if let Some((_, body)) = bodies.get_mut(&stream) { body.extend_from_slice(&chunk); }
                            }
                            Frame::End { stream } => {
                                if let Some((head, body)) = bodies.remove(&stream) {
                                    tasks.retain(|_, t| !t.is_finished());
                                    tasks.insert(stream, spawn_v2(client.clone(), limit.clone(), head, body, out_tx.clone()));
                                }
                            }
                            Frame::Reset { stream, .. } => {
                                bodies.remove(&stream);
                                if let Some(task) = tasks.remove(&stream) { task.abort(); }
                            }
                            Frame::Ping { nonce } => { let _ = out_tx.send(Message::Binary(Bytes::from(v2::to_vec(&Frame::Pong { nonce })))).await; }
                            Frame::GoAway { reason } => break Ended::Closed(started.elapsed(), format!("gateway going away: {reason}")),
                            _ => {}
                        }
                    }
                    Message::Text(text) => match v1::decode(&text, 16 * 1024 * 1024) {
                        Ok(v1::Message::Request(request)) => {
                            let (client, limit, out) = (client.clone(), limit.clone(), out_tx.clone());
                            tokio::spawn(async move {
                                let _permit = limit.acquire_owned().await;
                                let response = execute_v1(&client, request).await;
                                let _ = out.send(Message::Text(v1::encode(&v1::Message::Response(response)).into())).await;
                            });
                        }
                        Ok(_) => {}
                        Err(err) => break Ended::Closed(started.elapsed(), format!("malformed message: {err}")),
                    },
                    Message::Close(frame) => break Ended::Closed(started.elapsed(), format!("closed by the gateway: {}", frame.map(|f| f.reason.to_string()).unwrap_or_default())),
                    _ => {}
                }
            }
        }
    };
    for (_, task) in tasks {
        task.abort();
    }
    writer.abort();
    ended
}

fn build_request(
    method: &str,
    path: &str,
    query: &str,
    headers: impl Iterator<Item = (String, String)>,
    body: Vec<u8>,
) -> anyhow::Result<http::Request<kube::client::Body>> {
    let uri = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        // The caller's credentials never reach the build cluster: the agent's own are used.
        if matches!(
            name.to_ascii_lowercase().as_str(),
            "authorization" | "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            continue;
        }
        builder = builder.header(name, value);
    }
    Ok(builder.body(kube::client::Body::from(body))?)
}

fn spawn_v2(
    client: Client,
    limit: Arc<Semaphore>,
    head: Frame,
    body: Vec<u8>,
    out: mpsc::Sender<Message>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Frame::RequestHead {
            stream,
            method,
            path,
            query,
            headers,
            ..
        } = head
        else {
            return;
        };
        let send = |frame: Frame| {
            let out = out.clone();
            async move {
                out.send(Message::Binary(Bytes::from(v2::to_vec(&frame))))
                    .await
                    .is_ok()
            }
        };
        let _permit = limit.acquire_owned().await;
        let request = match build_request(&method, &path, &query, headers.into_iter(), body) {
            Ok(request) => request,
            Err(err) => {
                send(Frame::Reset {
                    stream,
                    code: 400,
                    reason: format!("invalid request: {err}"),
                })
                .await;
                return;
            }
        };
        let response = match client.send(request).await {
            Ok(response) => response,
            Err(err) => {
                send(Frame::Reset {
                    stream,
                    code: 502,
                    reason: format!("the build cluster's API server failed: {err}"),
                })
                .await;
                return;
            }
        };
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        if !send(Frame::ResponseHead {
            stream,
            status,
            headers,
            end_stream: false,
        })
        .await
        {
            return;
        }
        let mut body = response.into_body();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        for chunk in data.chunks(64 * 1024) {
                            if !send(Frame::Data {
                                stream,
                                chunk: chunk.to_vec(),
                            })
                            .await
                            {
                                return;
                            }
                        }
                    }
                }
                Some(Err(err)) => {
                    send(Frame::Reset {
                        stream,
                        code: 502,
                        reason: format!("reading the response: {err}"),
                    })
                    .await;
                    return;
                }
                None => break,
            }
        }
        send(Frame::End { stream }).await;
    })
}

async fn execute_v1(client: &Client, request: v1::HttpTunnelRequest) -> v1::HttpTunnelResponse {
    let request_id = request.request_id.clone();
    let failed = |status: u16, message: String| v1::HttpTunnelResponse {
        request_id: request_id.clone(),
        status_code: status,
        headers: None,
        body: None,
        error: Some(v1::TunnelError {
            code: Some(i32::from(status)),
            message,
            details: None,
        }),
    };
    let headers = request
        .headers
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)));
    let http_request = match build_request(
        &request.method,
        &request.path,
        request.query.as_deref().unwrap_or(""),
        headers,
        request.body.unwrap_or_default(),
    ) {
        Ok(r) => r,
        Err(err) => return failed(400, format!("invalid request: {err}")),
    };
    let response = match client.send(http_request).await {
        Ok(response) => response,
        Err(err) => return failed(502, format!("the build cluster's API server failed: {err}")),
    };
    let status = response.status().as_u16();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in response.headers() {
        if let Ok(v) = v.to_str() {
            headers
                .entry(k.as_str().to_owned())
                .or_default()
                .push(v.to_owned());
        }
    }
    match response.into_body().collect().await {
        Ok(body) => v1::HttpTunnelResponse {
            request_id,
            status_code: status,
            headers: Some(headers),
            body: Some(body.to_bytes().to_vec()),
            error: None,
        },
        Err(err) => failed(502, format!("reading the response: {err}")),
    }
}

async fn health(listen: SocketAddr, connected: Arc<AtomicBool>) {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let connected = connected.clone();
                async move {
                    if connected.load(Ordering::SeqCst) {
                        (axum::http::StatusCode::OK, "connected")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not connected to the gateway",
                        )
                    }
                }
            }),
        );
    if let Ok(listener) = tokio::net::TcpListener::bind(listen).await {
        let _ = axum::serve(listener, app).await;
    }
}
