//! Bundle parsing reasons, expired intermediates, and the served certificate swapped at runtime.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use buildplane_pki::{
    Ca, ClientCaBundle, ReloadableCert, Validity, VerifyError, agent_listener_config,
    client_config, install_crypto_provider, parse_cert_bundle,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const DAY: Duration = Duration::from_secs(86_400);

fn unix_now() -> i64 {
    i64::try_from(UnixTime::now().as_secs()).expect("now fits i64")
}

/// `ClientCaBundle::parse` says why a `clientCA` is unusable; an empty bundle built from DER
/// refuses every chain with `EmptyBundle` (it would accept nothing, never everything).
#[test]
fn bundle_parse_reports_empty_and_malformed() {
    assert_eq!(
        ClientCaBundle::parse(b"").expect_err("empty"),
        VerifyError::EmptyBundle
    );
    assert_eq!(
        ClientCaBundle::parse(b"just text, no PEM").expect_err("text"),
        VerifyError::EmptyBundle
    );
    assert!(matches!(
        ClientCaBundle::parse(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
        Err(VerifyError::Malformed(_))
    ));
    // Valid base64, but not a certificate: parse must look inside the PEM block.
    assert!(matches!(
        ClientCaBundle::parse(
            b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"
        ),
        Err(VerifyError::Malformed(_))
    ));

    let ca = Ca::generate("agent-ca", DAY).expect("ca");
    let leaf = ca.issue_client("plane-1", DAY).expect("leaf");
    let presented = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
    let bundle = ClientCaBundle::parse(ca.cert_pem().as_bytes()).expect("good bundle");
    assert_eq!(bundle.len(), 1);
    bundle
        .verify_client(&presented[0], &[], UnixTime::now())
        .expect("good chain accepted");
    assert_eq!(
        ClientCaBundle::from_ders(Vec::new()).verify_client(&presented[0], &[], UnixTime::now()),
        Err(VerifyError::EmptyBundle)
    );
}

/// A leaf under an expired intermediate is refused as expired, even though the leaf is fresh.
/// (Breaking the intermediates' validity check in webpki's path building turns this green->red.)
#[test]
fn expired_intermediate_refuses_a_fresh_leaf() {
    let root = Ca::generate("agent-root", 3650 * DAY).expect("root");
    let now = unix_now();
    let old = root
        .issue_intermediate_with(
            "old-intermediate",
            Validity {
                not_before: now - 10 * 86_400,
                not_after: now - 86_400,
            },
        )
        .expect("intermediate");
    assert_eq!(
        parse_cert_bundle(old.chain_pem().as_bytes())
            .expect("chain")
            .len(),
        1,
        "an intermediate's chain holds itself"
    );
    let leaf = old.issue_client("plane-1", DAY).expect("leaf");
    let presented = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
    assert_eq!(presented.len(), 2, "leaf PEM carries its intermediate");
    let bundle = ClientCaBundle::from_pem(root.cert_pem().as_bytes()).expect("bundle");
    assert_eq!(
        bundle.verify_client(&presented[0], &presented[1..], UnixTime::now()),
        Err(VerifyError::Expired)
    );
    // Two levels of intermediates: the chain PEM lists both, nearest first.
    let second = root
        .issue_intermediate("i1", DAY)
        .expect("i1")
        .issue_intermediate("i2", DAY)
        .expect("i2");
    let chain = parse_cert_bundle(second.chain_pem().as_bytes()).expect("chain");
    assert_eq!(chain.len(), 2);
    let leaf = second.issue_client("plane-1", DAY).expect("leaf");
    let presented = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
    bundle
        .verify_client(&presented[0], &presented[1..], UnixTime::now())
        .expect("leaf via two intermediates");
}

/// Accepts one TLS connection, reads one byte, and returns.
async fn serve_once(
    config: Arc<rustls::ServerConfig>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        if let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
            let mut byte = [0u8; 1];
            let _ = tls.read_exact(&mut byte).await;
        }
    });
    (addr, task)
}

/// Connects and returns the server's leaf, or the handshake error.
async fn served_leaf(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<CertificateDer<'static>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no server certificate")?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    Ok(leaf)
}

/// Replacing the gateway's serving certificate changes what the next handshake serves, without
/// rebuilding the `ServerConfig`; a failed replacement keeps the current one. An expired
/// serving certificate is refused by `client_config`.
#[tokio::test]
async fn replaced_server_certificate_is_served_by_the_next_handshake() {
    install_crypto_provider();
    let ip = "127.0.0.1".parse().expect("ip");
    let server_ca = Ca::generate("gateway-ca", DAY).expect("ca");
    let first = server_ca
        .issue_server(&["localhost"], &[ip], DAY)
        .expect("first");
    let serving = ReloadableCert::from_pem(&first.cert_pem, &first.key_pem).expect("serving");
    let config = agent_listener_config(serving.clone()).expect("server config");
    let client = client_config(server_ca.cert_pem().as_bytes(), None).expect("client config");

    let (addr, server) = serve_once(config.clone()).await;
    let seen_first = served_leaf(addr, client.clone()).await.expect("first");
    server.await.expect("joined");
    assert_eq!(
        seen_first,
        parse_cert_bundle(first.cert_pem.as_bytes()).expect("pem")[0]
    );

    let second = server_ca
        .issue_server(&["localhost"], &[ip], 2 * DAY)
        .expect("second");
    serving
        .replace_from_pem(&second.cert_pem, &second.key_pem)
        .expect("replaced");
    // A mismatched pair is refused and does not replace the served certificate.
    assert!(
        serving
            .replace_from_pem(&first.cert_pem, &second.key_pem)
            .is_err(),
        "certificate and key of different leaves"
    );
    let (addr, server) = serve_once(config.clone()).await;
    let seen_second = served_leaf(addr, client.clone()).await.expect("second");
    server.await.expect("joined");
    assert_eq!(
        seen_second,
        parse_cert_bundle(second.cert_pem.as_bytes()).expect("pem")[0],
        "the renewed serving certificate is used by the next handshake"
    );

    let now = unix_now();
    let expired = server_ca
        .issue_server_with(
            &["localhost"],
            &[ip],
            Validity {
                not_before: now - 2 * 86_400,
                not_after: now - 86_400,
            },
        )
        .expect("expired");
    serving
        .replace_from_pem(&expired.cert_pem, &expired.key_pem)
        .expect("replaced with the expired one");
    let (addr, server) = serve_once(config).await;
    let err = served_leaf(addr, client)
        .await
        .expect_err("an expired serving certificate is refused");
    server.await.expect("joined");
    assert!(err.to_lowercase().contains("expired"), "{err}");
}
