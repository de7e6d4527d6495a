//! The table of good and bad chains, and real handshakes over loopback.

use std::time::Duration;

use rcgen::ExtendedKeyUsagePurpose;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> UnixTime {
    UnixTime::now()
}

/// A presented chain: the leaf's PEM (leaf first, then intermediates).
fn chain(leaf: &Leaf) -> Vec<CertificateDer<'static>> {
    parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("leaf PEM")
}

fn check(
    bundle_pem: &str,
    presented: &[CertificateDer<'static>],
    expected: Result<(), VerifyError>,
    case: &str,
) {
    let res = ClientCaBundle::from_pem(bundle_pem.as_bytes())
        .map_err(|e| VerifyError::Invalid(e.to_string()))
        .and_then(|bundle| bundle.verify_client(&presented[0], &presented[1..], now()));
    assert_eq!(res, expected, "{case}");
}

/// Every good and bad chain the gateway can be shown, with the verdict and its reason.
#[test]
fn chain_table() {
    let ca = Ca::generate("agent-ca", 3650 * DAY).expect("ca");
    let other = Ca::generate("other-ca", 3650 * DAY).expect("other ca");
    let intermediate = ca
        .issue_intermediate("agent-intermediate", 365 * DAY)
        .expect("intermediate");
    let good = ca.issue_client("plane-1", DAY).expect("leaf");
    let via_intermediate = intermediate
        .issue_client("plane-1", DAY)
        .expect("leaf via intermediate");
    let now_s = unix_now();
    let expired = ca
        .issue_client_with(
            "plane-1",
            Validity {
                not_before: now_s - 10 * 86_400,
                not_after: now_s - 86_400,
            },
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )
        .expect("expired leaf");
    let future = ca
        .issue_client_with(
            "plane-1",
            Validity {
                not_before: now_s + 86_400,
                not_after: now_s + 10 * 86_400,
            },
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )
        .expect("future leaf");
    let server_only = ca
        .issue_client_with(
            "plane-1",
            Validity::from_now(DAY),
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )
        .expect("server-auth leaf");
    let wrong_ca = other
        .issue_client("plane-1", DAY)
        .expect("leaf of another CA");
    let self_signed = self_signed_client("plane-1", DAY).expect("self-signed leaf");

    check(
        ca.cert_pem(),
        &chain(&good),
        Ok(()),
        "leaf signed by the CA",
    );
    check(
        ca.cert_pem(),
        &chain(&via_intermediate),
        Ok(()),
        "leaf via a presented intermediate",
    );
    check(
        ca.cert_pem(),
        &chain(&via_intermediate)[..1],
        Err(VerifyError::UnknownIssuer),
        "truncated chain: intermediate missing",
    );
    check(
        ca.cert_pem(),
        &chain(&wrong_ca),
        Err(VerifyError::UnknownIssuer),
        "wrong CA",
    );
    check(
        ca.cert_pem(),
        &chain(&expired),
        Err(VerifyError::Expired),
        "expired leaf",
    );
    check(
        ca.cert_pem(),
        &chain(&future),
        Err(VerifyError::NotYetValid),
        "not yet valid leaf",
    );
    check(
        ca.cert_pem(),
        &chain(&server_only),
        Err(VerifyError::WrongUsage),
        "server-auth-only EKU",
    );
    let rotation = format!("{}{}", ca.cert_pem(), other.cert_pem());
    check(
        &rotation,
        &chain(&good),
        Ok(()),
        "old CA of a rotation bundle",
    );
    check(
        &rotation,
        &chain(&wrong_ca),
        Ok(()),
        "new CA of a rotation bundle",
    );
    check(
        &self_signed.cert_pem,
        &chain(&self_signed),
        Ok(()),
        "self-signed leaf as its own clientCA (OpenChoreo's chart)",
    );
    check(
        &self_signed.cert_pem,
        &chain(&good),
        Err(VerifyError::UnknownIssuer),
        "another leaf against a pinned self-signed leaf",
    );
}

/// Garbage and empty bundles are rejected when parsed, with a reason.
#[test]
fn garbage_and_empty_bundles_are_rejected() {
    for (pem, case) in [
        ("", "empty"),
        ("hello", "garbage"),
        (
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "bad base64",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "a key, not a certificate",
        ),
    ] {
        let err = ClientCaBundle::from_pem(pem.as_bytes()).expect_err(case);
        assert!(matches!(err, Error::InvalidPem(_)), "{case}: {err}");
    }
    let ca = Ca::generate("ca", DAY).expect("ca");
    let truncated = &ca.cert_pem()[..ca.cert_pem().len() / 2];
    assert!(
        ClientCaBundle::from_pem(truncated.as_bytes()).is_err(),
        "truncated PEM"
    );
    let garbage_der = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let bundle = ClientCaBundle::from_pem(ca.cert_pem().as_bytes()).expect("bundle");
    assert!(matches!(
        bundle.verify_client(&garbage_der, &[], now()),
        Err(VerifyError::Invalid(_))
    ));
}

/// A CA reloaded from PEM keeps issuing leaves that chain to the same certificate (renewal).
#[test]
fn renewal_under_the_same_ca() {
    let ca = Ca::generate("agent-ca", 3650 * DAY).expect("ca");
    let reloaded = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("reloaded");
    let renewed = reloaded
        .issue_client("plane-1", 2 * DAY)
        .expect("renewed leaf");
    check(
        ca.cert_pem(),
        &chain(&renewed),
        Ok(()),
        "renewed leaf under the reloaded CA",
    );
    assert!(renewed.not_after().expect("not after") > unix_now() + 86_400);
}

mod handshakes {
    use std::net::SocketAddr;

    use rustls_pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    struct Fixture {
        server_ca: Ca,
        server_cert: Arc<ReloadableCert>,
    }

    fn fixture() -> Fixture {
        install_crypto_provider();
        let server_ca = Ca::generate("gateway-ca", DAY).expect("ca");
        let leaf = server_ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().expect("ip")], DAY)
            .expect("server leaf");
        let server_cert =
            ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem).expect("server cert");
        Fixture {
            server_ca,
            server_cert,
        }
    }

    /// Serves one connection; returns the client chain the server saw, or the handshake error.
    async fn serve_once(
        config: Arc<rustls::ServerConfig>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<Vec<CertificateDer<'static>>, String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default();
            Ok(peer)
        });
        (addr, task)
    }

    async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())
    }

    /// The agent listener accepts a client of an unknown CA and exposes its chain for admission.
    #[tokio::test]
    async fn agent_listener_defers_trust_to_admission() {
        let fx = fixture();
        let (addr, server) =
            serve_once(agent_listener_config(fx.server_cert.clone()).expect("config")).await;
        let unknown = Ca::generate("unknown-agent-ca", DAY)
            .expect("ca")
            .issue_client("p", DAY)
            .expect("leaf");
        let client_cert =
            ReloadableCert::from_pem(&unknown.cert_pem, &unknown.key_pem).expect("client cert");
        connect(
            addr,
            client_config(
                fx.server_ca.cert_pem().as_bytes(),
                Some(client_cert.clone()),
            )
            .expect("client"),
        )
        .await
        .expect("handshake");
        let peer = server.await.expect("joined").expect("served");
        assert_eq!(
            peer[0],
            client_cert.leaf(),
            "the server saw the agent's leaf"
        );
    }

    /// The internal API rejects a client certificate from another CA.
    #[tokio::test]
    async fn internal_api_rejects_a_foreign_client() {
        let fx = fixture();
        let internal_ca = Ca::generate("internal-ca", DAY).expect("ca");
        let config = mtls_server_config(fx.server_cert.clone(), internal_ca.cert_pem().as_bytes())
            .expect("config");
        let (addr, server) = serve_once(config.clone()).await;
        let foreign = Ca::generate("agent-ca", DAY)
            .expect("ca")
            .issue_client("agent", DAY)
            .expect("leaf");
        let foreign = ReloadableCert::from_pem(&foreign.cert_pem, &foreign.key_pem).expect("cert");
        let _ = connect(
            addr,
            client_config(fx.server_ca.cert_pem().as_bytes(), Some(foreign)).expect("client"),
        )
        .await;
        let res = server.await.expect("joined");
        assert!(
            res.is_err(),
            "an agent certificate must not reach the internal API"
        );

        let (addr, server) = serve_once(config).await;
        let controller = internal_ca
            .issue_client("buildplane-controller", DAY)
            .expect("leaf");
        let controller =
            ReloadableCert::from_pem(&controller.cert_pem, &controller.key_pem).expect("cert");
        connect(
            addr,
            client_config(fx.server_ca.cert_pem().as_bytes(), Some(controller)).expect("client"),
        )
        .await
        .expect("the controller's certificate is accepted");
        server.await.expect("joined").expect("served");
    }

    /// Replacing a reloadable certificate changes what the next handshake presents.
    #[tokio::test]
    async fn reloaded_certificate_is_used_by_the_next_handshake() {
        let fx = fixture();
        let config = agent_listener_config(fx.server_cert.clone()).expect("config");
        let ca = Ca::generate("agent-ca", DAY).expect("ca");
        let first = ca.issue_client("p", DAY).expect("leaf");
        let client_cert = ReloadableCert::from_pem(&first.cert_pem, &first.key_pem).expect("cert");
        let client = client_config(
            fx.server_ca.cert_pem().as_bytes(),
            Some(client_cert.clone()),
        )
        .expect("client");
        let (addr, server) = serve_once(config.clone()).await;
        connect(addr, client.clone())
            .await
            .expect("first handshake");
        let first_seen = server.await.expect("joined").expect("served");
        let second = ca.issue_client("p", DAY).expect("renewed leaf");
        client_cert
            .replace_from_pem(&second.cert_pem, &second.key_pem)
            .expect("replaced");
        let (addr, server) = serve_once(config).await;
        connect(addr, client).await.expect("second handshake");
        let second_seen = server.await.expect("joined").expect("served");
        assert_ne!(
            first_seen[0], second_seen[0],
            "the renewed leaf was presented"
        );
    }
}
