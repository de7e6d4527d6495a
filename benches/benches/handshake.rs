//! Handshake admission: full mTLS handshakes per second through the gateway's agent listener
//! (TLS, WebSocket upgrade, `Trust::admit`, registration; the 101 answer awaited) against raw
//! rustls handshakes per second with the same server configuration (requesting a client
//! certificate, no resumption) and the same client, on loopback.
//!
//! One iteration is a batch of concurrent handshakes; throughput is in handshakes.

use std::{sync::Arc, time::Duration};

use buildplane_benches::{Backend, Pki, Tunnel, fixture};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::try_join_all;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

/// Handshakes in flight at once (below the gateway's cap of 256 concurrent handshakes).
const BATCH: usize = 32;

/// One client configuration per slot of a batch, each with its own leaf (key), as agents have:
/// one key may hold only a few connections at the gateway.
fn client_tls(pki: &Pki) -> Vec<Arc<rustls::ClientConfig>> {
    (0..BATCH)
        .map(|i| {
            let leaf = pki
                .agent_ca
                .issue_client(&format!("bench-hs-{i}"), Duration::from_secs(86_400))
                .expect("agent leaf");
            let cert = buildplane_pki::ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem)
                .expect("agent cert");
            let mut tls =
                (*buildplane_pki::client_config(pki.server_ca.cert_pem().as_bytes(), Some(cert))
                    .expect("client TLS"))
                .clone();
            tls.resumption = rustls::client::Resumption::disabled();
            Arc::new(tls)
        })
        .collect()
}

async fn tls_connect(
    tls: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
    Ok(tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?)
}

/// One admission: TLS, upgrade with the v2 offer, 101, close.
async fn admit(
    tls: &Arc<rustls::ClientConfig>,
    tunnel: &Tunnel,
    agent_id: usize,
) -> anyhow::Result<()> {
    let stream = tls_connect(tls, tunnel.gateway.agent_addr).await?;
    let plane = fixture::plane(2);
    let mut request = format!(
        "{}?planeID={plane}&planeType=buildplane&agentID=hs-{agent_id}",
        tunnel.agent_url()
    )
    .into_client_request()?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("buildplane.tunnel.v2, buildplane.tunnel.v1"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let _ = ws.close(None).await;
    Ok(())
}

/// A raw rustls server: full handshake, then one byte so the client knows it completed.
async fn raw_server(pki: &Pki) -> std::net::SocketAddr {
    let mut config = (*buildplane_pki::agent_listener_config(pki.server_cert().expect("cert"))
        .expect("server TLS"))
    .clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"!").await;
                    let _ = tls.flush().await;
                    let mut byte = [0u8; 1];
                    let _ = tls.read(&mut byte).await;
                }
            });
        }
    });
    addr
}

async fn raw(tls: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut stream = tls_connect(tls, addr).await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

fn handshake(c: &mut Criterion) {
    buildplane_benches::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let pki = Pki::generate().expect("PKI");
    let (tunnel, raw_addr) = rt.block_on(async {
        let backend = Backend::start().await.expect("backend");
        let tunnel = Tunnel::start(&pki, &backend).await.expect("tunnel");
        (tunnel, raw_server(&pki).await)
    });
    let tls = client_tls(&pki);
    let quick = buildplane_benches::quick();
    let mut group = c.benchmark_group("handshake");
    group
        .throughput(Throughput::Elements(BATCH as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 3000 }));
    group.bench_function("raw_rustls", |b| {
        b.to_async(&rt).iter(|| async {
            try_join_all(tls.iter().map(|tls| raw(tls, raw_addr)))
                .await
                .expect("raw handshakes")
        })
    });
    group.bench_function("gateway_admission", |b| {
        b.to_async(&rt).iter(|| async {
            try_join_all(
                tls.iter()
                    .enumerate()
                    .map(|(i, tls)| admit(tls, &tunnel, i)),
            )
            .await
            .expect("admissions")
        })
    });
    group.finish();
    drop(tunnel);
}

/// One chain verification against a rotation bundle (two CAs, the leaf under the second), run
/// and remembered: what a re-verification pass costs per connection without and with the
/// verdict cache.
fn verdicts(c: &mut Criterion) {
    let pki = Pki::generate().expect("PKI");
    let old =
        buildplane_pki::Ca::generate("old-agent-ca", Duration::from_secs(86_400)).expect("old CA");
    let leaf = pki
        .agent_ca
        .issue_client("bench-verdict", Duration::from_secs(86_400))
        .expect("leaf");
    let chain = buildplane_pki::parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
    let bundle = buildplane_pki::ClientCaBundle::from_pem(
        format!("{}{}", old.cert_pem(), pki.agent_ca.cert_pem()).as_bytes(),
    )
    .expect("bundle");
    let quick = buildplane_benches::quick();
    let mut group = c.benchmark_group("verdict");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 2000 }));
    for (name, capacity) in [("verify", 0), ("remembered", 1024)] {
        let cache = buildplane_pki::VerdictCache::with_capacity(capacity);
        group.bench_function(name, |b| {
            b.iter(|| {
                cache
                    .verify(
                        &bundle,
                        &chain[0],
                        &chain[1..],
                        rustls_pki_types::UnixTime::now(),
                    )
                    .expect("verified")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, handshake, verdicts);
criterion_main!(benches);
