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

/// A self-signed CA with explicit validity and basicConstraints (the public constructors make
/// unconstrained CAs only).
fn ca_with(common_name: &str, validity: Validity, constraints: BasicConstraints) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = params(common_name, validity).expect("params");
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-signed CA");
    Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
        chain_pem: String::new(),
    }
}

/// OpenChoreo's self-signed, non-CA agent leaf with explicit validity, as a `Ca` so that tests
/// can sign other leaves with its key (what a holder of a pinned leaf's key could do).
fn self_signed_leaf_with(common_name: &str, validity: Validity) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = params(common_name, validity).expect("params");
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).expect("self-signed leaf");
    Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
        chain_pem: String::new(),
    }
}

/// What a case expects.
#[derive(Debug, PartialEq)]
enum Expect {
    /// The chain verifies against the bundle.
    Accepted,
    /// The chain is rejected for this reason.
    Rejected(VerifyError),
    /// The bundle itself does not parse (so no chain can verify against it).
    BadBundle,
}

/// One row of the table: a `clientCA` bundle, a presented chain (leaf first) and the verdict.
struct Case {
    name: &'static str,
    bundle_pem: String,
    presented: Vec<CertificateDer<'static>>,
}

fn check(case: Case, expected: Expect) {
    let res = match ClientCaBundle::from_pem(case.bundle_pem.as_bytes()) {
        Err(Error::InvalidPem(_)) => Expect::BadBundle,
        Err(other) => panic!("{}: unexpected bundle error {other}", case.name),
        Ok(bundle) => {
            let now = now();
            let direct = bundle.verify_client(&case.presented[0], &case.presented[1..], now);
            // The verdict cache gives the same answer, cold and warm.
            let cache = VerdictCache::default();
            for round in ["cold", "warm"] {
                let cached = cache
                    .verify(&bundle, &case.presented[0], &case.presented[1..], now)
                    .map(drop);
                assert_eq!(cached, direct, "{}: cached verdict ({round})", case.name);
            }
            match direct {
                Ok(()) => Expect::Accepted,
                Err(err) => Expect::Rejected(err),
            }
        }
    };
    assert_eq!(res, expected, "{}", case.name);
}

/// Every good and bad chain the gateway can be shown, with the verdict and its reason.
/// Breaking the EKU mapping, the expiry check or the intermediates plumbing in `verify_client`
/// turns one of these rows red.
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
    let past = Validity {
        not_before: now_s - 10 * 86_400,
        not_after: now_s - 86_400,
    };
    let future = Validity {
        not_before: now_s + 86_400,
        not_after: now_s + 10 * 86_400,
    };
    let client_auth = [ExtendedKeyUsagePurpose::ClientAuth];
    let expired = ca
        .issue_client_with("plane-1", past, &client_auth)
        .expect("expired leaf");
    let not_yet_valid = ca
        .issue_client_with("plane-1", future, &client_auth)
        .expect("future leaf");
    let server_only = ca
        .issue_client_with(
            "plane-1",
            Validity::from_now(DAY),
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )
        .expect("server-auth leaf");
    let no_eku = ca
        .issue_client_with("plane-1", Validity::from_now(DAY), &[])
        .expect("leaf without EKU");
    let wrong_ca = other
        .issue_client("plane-1", DAY)
        .expect("leaf of another CA");
    let self_signed = self_signed_client("plane-1", DAY).expect("self-signed leaf");
    let rotation = format!("{}{}", ca.cert_pem(), other.cert_pem());
    let bundle = |pem: &str| pem.to_owned();

    let table = [
        (
            Case {
                name: "leaf signed by the CA",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&good),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "leaf via a presented intermediate",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&via_intermediate),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "truncated chain: intermediate missing",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&via_intermediate)[..1].to_vec(),
            },
            Expect::Rejected(VerifyError::UnknownIssuer),
        ),
        (
            Case {
                name: "wrong CA",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&wrong_ca),
            },
            Expect::Rejected(VerifyError::UnknownIssuer),
        ),
        (
            Case {
                name: "expired leaf",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&expired),
            },
            Expect::Rejected(VerifyError::Expired),
        ),
        (
            Case {
                name: "not yet valid leaf",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&not_yet_valid),
            },
            Expect::Rejected(VerifyError::NotYetValid),
        ),
        (
            Case {
                name: "server-auth-only EKU",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&server_only),
            },
            Expect::Rejected(VerifyError::WrongUsage),
        ),
        (
            Case {
                name: "no EKU at all (any usage, as Go treats it)",
                bundle_pem: bundle(ca.cert_pem()),
                presented: chain(&no_eku),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "old CA of a rotation bundle",
                bundle_pem: rotation.clone(),
                presented: chain(&good),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "new CA of a rotation bundle",
                bundle_pem: rotation.clone(),
                presented: chain(&wrong_ca),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "self-signed non-CA leaf as its own clientCA (OpenChoreo's chart)",
                bundle_pem: self_signed.cert_pem.clone(),
                presented: chain(&self_signed),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "another leaf against a pinned self-signed leaf",
                bundle_pem: self_signed.cert_pem.clone(),
                presented: chain(&good),
            },
            Expect::Rejected(VerifyError::UnknownIssuer),
        ),
        (
            Case {
                name: "empty bundle",
                bundle_pem: String::new(),
                presented: chain(&good),
            },
            Expect::BadBundle,
        ),
        (
            Case {
                name: "garbage PEM bundle",
                bundle_pem: "hello, not a certificate".into(),
                presented: chain(&good),
            },
            Expect::BadBundle,
        ),
        (
            Case {
                name: "PEM with bad base64",
                bundle_pem: "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".into(),
                presented: chain(&good),
            },
            Expect::BadBundle,
        ),
        (
            Case {
                name: "a key, not a certificate",
                bundle_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
                presented: chain(&good),
            },
            Expect::BadBundle,
        ),
        (
            Case {
                name: "garbage DER presented as the leaf",
                bundle_pem: bundle(ca.cert_pem()),
                presented: vec![CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])],
            },
            Expect::Rejected(VerifyError::Malformed("BadDer".into())),
        ),
    ];
    for (case, expected) in table {
        check(case, expected);
    }
}

/// The clientCA certificate's own constraints count (issue #19): webpki ignores a trust anchor's
/// validity and pathLen, so before `verify_client` checked them, the rows "leaf of an expired
/// CA", "leaf via an intermediate of a pathLen 0 CA" and "fresh leaf signed by an expired pinned
/// leaf" were accepted.
#[test]
fn trust_anchor_constraints_table() {
    let now_s = unix_now();
    let past = Validity {
        not_before: now_s - 10 * 86_400,
        not_after: now_s - 86_400,
    };
    let future = Validity {
        not_before: now_s + 86_400,
        not_after: now_s + 10 * 86_400,
    };
    let valid = Validity::from_now(3650 * DAY);
    let fresh = Validity::from_now(DAY);
    let client_auth = [ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_of = |ca: &Ca| {
        ca.issue_client_with("plane-1", fresh, &client_auth)
            .expect("leaf")
    };

    let expired_ca = ca_with("expired-ca", past, BasicConstraints::Unconstrained);
    let future_ca = ca_with("future-ca", future, BasicConstraints::Unconstrained);
    let valid_ca = ca_with("valid-ca", valid, BasicConstraints::Unconstrained);
    let path_len_0 = ca_with("constrained-ca", valid, BasicConstraints::Constrained(0));
    let under_path_len_0 = path_len_0
        .issue_intermediate("intermediate", 365 * DAY)
        .expect("intermediate");
    let path_len_1 = ca_with("one-level-ca", valid, BasicConstraints::Constrained(1));
    let under_path_len_1 = path_len_1
        .issue_intermediate("intermediate", 365 * DAY)
        .expect("intermediate");
    let expired_pin = self_signed_leaf_with("pinned-agent", past);
    let valid_pin = self_signed_leaf_with("pinned-agent", fresh);
    // The same CA (subject and key) re-issued with a new validity: the expired certificate and
    // its renewal side by side in a bundle.
    let reissued_key = KeyPair::generate().expect("key");
    let reissued = |validity| {
        let mut params = params("reissued-ca", validity).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&reissued_key).expect("CA");
        (cert.pem(), params)
    };
    let (reissued_old_pem, _) = reissued(past);
    let (reissued_new_pem, reissued_params) = reissued(valid);
    let reissued_ca = Ca {
        cert_pem: reissued_new_pem.clone(),
        key_pem: reissued_key.serialize_pem(),
        issuer: Issuer::new(
            reissued_params,
            KeyPair::from_pem(&reissued_key.serialize_pem()).expect("key"),
        ),
        chain_pem: String::new(),
    };

    let table = [
        (
            Case {
                name: "leaf of an expired CA",
                bundle_pem: expired_ca.cert_pem().to_owned(),
                presented: chain(&leaf_of(&expired_ca)),
            },
            Expect::Rejected(VerifyError::CaExpired {
                ca: "expired-ca".into(),
            }),
        ),
        (
            Case {
                name: "leaf of a CA that is not valid yet",
                bundle_pem: future_ca.cert_pem().to_owned(),
                presented: chain(&leaf_of(&future_ca)),
            },
            Expect::Rejected(VerifyError::CaNotYetValid {
                ca: "future-ca".into(),
            }),
        ),
        (
            Case {
                name: "leaf of a valid CA",
                bundle_pem: valid_ca.cert_pem().to_owned(),
                presented: chain(&leaf_of(&valid_ca)),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "leaf of the expired CA of a rotation bundle",
                bundle_pem: format!("{}{}", expired_ca.cert_pem(), valid_ca.cert_pem()),
                presented: chain(&leaf_of(&expired_ca)),
            },
            Expect::Rejected(VerifyError::CaExpired {
                ca: "expired-ca".into(),
            }),
        ),
        (
            Case {
                name: "leaf of the valid CA of a rotation bundle with an expired one",
                bundle_pem: format!("{}{}", expired_ca.cert_pem(), valid_ca.cert_pem()),
                presented: chain(&leaf_of(&valid_ca)),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "leaf of a re-issued CA, expired certificate listed first",
                bundle_pem: format!("{reissued_old_pem}{reissued_new_pem}"),
                presented: chain(&leaf_of(&reissued_ca)),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "leaf of a re-issued CA whose bundle has only the expired certificate",
                bundle_pem: reissued_old_pem.clone(),
                presented: chain(&leaf_of(&reissued_ca)),
            },
            Expect::Rejected(VerifyError::CaExpired {
                ca: "reissued-ca".into(),
            }),
        ),
        (
            Case {
                name: "leaf directly under a pathLen 0 CA",
                bundle_pem: path_len_0.cert_pem().to_owned(),
                presented: chain(&leaf_of(&path_len_0)),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "leaf via an intermediate of a pathLen 0 CA",
                bundle_pem: path_len_0.cert_pem().to_owned(),
                presented: chain(&leaf_of(&under_path_len_0)),
            },
            Expect::Rejected(VerifyError::PathLenExceeded {
                ca: "constrained-ca".into(),
                path_len: 0,
                intermediates: 1,
            }),
        ),
        (
            Case {
                name: "leaf via an intermediate of a pathLen 1 CA",
                bundle_pem: path_len_1.cert_pem().to_owned(),
                presented: chain(&leaf_of(&under_path_len_1)),
            },
            Expect::Accepted,
        ),
        (
            Case {
                name: "fresh leaf signed by an expired pinned leaf",
                bundle_pem: expired_pin.cert_pem().to_owned(),
                presented: chain(&leaf_of(&expired_pin)),
            },
            Expect::Rejected(VerifyError::CaExpired {
                ca: "pinned-agent".into(),
            }),
        ),
        (
            Case {
                name: "valid pinned self-signed leaf presenting itself",
                bundle_pem: valid_pin.cert_pem().to_owned(),
                presented: parse_cert_bundle(valid_pin.cert_pem().as_bytes()).expect("pin"),
            },
            Expect::Accepted,
        ),
    ];
    for (case, expected) in table {
        check(case, expected);
    }
}

/// A self-signed leaf pasted as its own clientCA is not a bypass: once expired it is refused.
#[test]
fn expired_self_signed_leaf_is_refused_even_when_pinned() {
    let now_s = unix_now();
    let key = KeyPair::generate().expect("key");
    let mut params = params(
        "plane-1",
        Validity {
            not_before: now_s - 10 * 86_400,
            not_after: now_s - 86_400,
        },
    )
    .expect("params");
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).expect("self-signed");
    check(
        Case {
            name: "expired self-signed leaf as its own clientCA",
            bundle_pem: cert.pem(),
            presented: vec![cert.der().clone()],
        },
        Expect::Rejected(VerifyError::Expired),
    );
}

/// A truncated PEM block is not half a certificate.
/// The CA a chain verified under is told by its key: each CA of a rotation bundle has its own
/// id, the same for every leaf it issues, and equal to the id of its own public key.
#[test]
fn verified_chain_names_its_ca() {
    let day = Duration::from_secs(86_400);
    let (one, two) = (
        Ca::generate("one", day).unwrap(),
        Ca::generate("two", day).unwrap(),
    );
    let bundle =
        ClientCaBundle::from_pem(format!("{}{}", one.cert_pem(), two.cert_pem()).as_bytes())
            .unwrap();
    let id = |ca: &Ca| {
        let chain = chain(&ca.issue_client("agent", day).unwrap());
        bundle
            .verify_client_anchor(&chain[0], &chain[1..], now())
            .unwrap()
    };
    assert_eq!(id(&one), id(&one));
    assert_ne!(id(&one), id(&two));
    let der = parse_cert_bundle(two.cert_pem().as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
    let spki = cert.tbs_certificate.subject_pki.raw;
    let id_two = id(&two);
    assert!(
        spki.ends_with(id_two.public_key()) && spki.len() - id_two.public_key().len() <= 4,
        "the id is the CA's SubjectPublicKeyInfo without its SEQUENCE header"
    );
}

#[test]
fn truncated_pem_bundle_is_rejected() {
    let ca = Ca::generate("ca", DAY).expect("ca");
    let truncated = &ca.cert_pem()[..ca.cert_pem().len() / 2];
    assert!(ClientCaBundle::from_pem(truncated.as_bytes()).is_err());
}

/// A certificate and a key that do not belong together are refused when loaded.
#[test]
fn mismatched_certificate_and_key_are_refused() {
    let ca = Ca::generate("ca", DAY).expect("ca");
    let first = ca.issue_client("p", DAY).expect("leaf");
    let second = ca.issue_client("p", DAY).expect("leaf");
    let err = ReloadableCert::from_pem(&first.cert_pem, &second.key_pem).expect_err("mismatch");
    assert!(matches!(err, Error::InvalidKey(_)), "{err}");
    let reloadable = ReloadableCert::from_pem(&first.cert_pem, &first.key_pem).expect("pair");
    assert!(
        reloadable
            .replace_from_pem(&second.cert_pem, &first.key_pem)
            .is_err()
    );
    let leaf = parse_cert_bundle(first.cert_pem.as_bytes()).expect("leaf");
    assert_eq!(
        reloadable.leaf(),
        leaf[0],
        "a refused replacement keeps the old pair"
    );
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
        Case {
            name: "renewed leaf under the reloaded CA",
            bundle_pem: ca.cert_pem().to_owned(),
            presented: chain(&renewed),
        },
        Expect::Accepted,
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

    /// Presents one certificate but signs with another key: a client that copied an agent's
    /// certificate without its key.
    #[derive(Debug)]
    struct StolenCert(Arc<CertifiedKey>);

    impl ResolvesClientCert for StolenCert {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    /// The agent listener accepts any chain but not a certificate whose key the client lacks:
    /// if `AdmitAfterHandshake::verify_tls13_signature` returned success without checking, the
    /// stolen certificate would be admitted and this test would fail.
    #[tokio::test]
    async fn agent_listener_rejects_a_client_without_the_private_key() {
        let fx = fixture();
        let (addr, server) =
            serve_once(agent_listener_config(fx.server_cert.clone()).expect("config")).await;
        let ca = Ca::generate("agent-ca", DAY).expect("ca");
        let victim = ca.issue_client("p", DAY).expect("leaf");
        let thief = ca.issue_client("p", DAY).expect("leaf");
        let stolen = CertifiedKey::new(
            parse_cert_bundle(victim.cert_pem.as_bytes()).expect("chain"),
            provider()
                .key_provider
                .load_private_key(parse_private_key(thief.key_pem.as_bytes()).expect("key"))
                .expect("signing key"),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(parse_cert_bundle(fx.server_ca.cert_pem().as_bytes()).expect("ca")[0].clone())
            .expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(StolenCert(Arc::new(stolen))));
        let _ = connect(addr, Arc::new(client)).await;
        let res = server.await.expect("joined");
        let err = res.expect_err("a client without the key must not complete the handshake");
        assert!(
            err.to_lowercase().contains("signature"),
            "rejected for the signature: {err}"
        );
    }

    /// The agent listener requests but does not require a certificate: a client without one
    /// completes the handshake with no peer certificates, and admission answers 401 later.
    #[tokio::test]
    async fn agent_listener_lets_a_client_without_certificate_through_to_admission() {
        let fx = fixture();
        let (addr, server) =
            serve_once(agent_listener_config(fx.server_cert.clone()).expect("config")).await;
        connect(
            addr,
            client_config(fx.server_ca.cert_pem().as_bytes(), None).expect("client"),
        )
        .await
        .expect("handshake");
        let peer = server.await.expect("joined").expect("served");
        assert!(peer.is_empty(), "no certificate was presented");
    }

    /// The internal API requires a client certificate.
    #[tokio::test]
    async fn internal_api_rejects_a_client_without_certificate() {
        let fx = fixture();
        let internal_ca = Ca::generate("internal-ca", DAY).expect("ca");
        let config = mtls_server_config(fx.server_cert.clone(), internal_ca.cert_pem().as_bytes())
            .expect("config");
        let (addr, server) = serve_once(config).await;
        let _ = connect(
            addr,
            client_config(fx.server_ca.cert_pem().as_bytes(), None).expect("client"),
        )
        .await;
        assert!(server.await.expect("joined").is_err());
    }
}

/// A renewed certificate (new key) keeps its subject; another name, another CA's leaf of
/// another name, or bytes that are no certificate do not match.
#[test]
fn same_subject_matches_names_not_keys() {
    let ca = Ca::generate("internal-ca", DAY).unwrap();
    let peer = chain(&ca.issue_client("cluster-gateway-peer", DAY).unwrap())[0].clone();
    let renewed = chain(&ca.issue_client("cluster-gateway-peer", DAY).unwrap())[0].clone();
    let harness = chain(&ca.issue_client("buildplane-e2e-harness", DAY).unwrap())[0].clone();
    assert_ne!(peer, renewed, "a new key and serial");
    assert!(same_subject(&peer, &renewed));
    assert!(same_subject(&peer, &peer));
    assert!(!same_subject(&peer, &harness));
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(!same_subject(&peer, &junk));
    assert!(
        !same_subject(&junk, &junk),
        "what does not parse names nothing"
    );
}
