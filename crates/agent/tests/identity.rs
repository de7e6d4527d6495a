//! The agent's identity against a real API server (kube-sim): bootstrap, reuse, renewal under
//! the same CA, CA rotation.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use buildplane_api::names;
use buildplane_pki::{ClientCaBundle, parse_cert_bundle};
use cluster_agent::identity;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube_sim::{Config, Server};
use rustls_pki_types::UnixTime;

const NS: &str = "openchoreo-build-plane";
const DAY: Duration = Duration::from_secs(86_400);

fn verifies(bundle_pem: &str, leaf_pem: &str) -> bool {
    let bundle = ClientCaBundle::from_pem(bundle_pem.as_bytes()).expect("bundle");
    let chain = parse_cert_bundle(leaf_pem.as_bytes()).expect("leaf");
    bundle
        .verify_client(&chain[0], &chain[1..], UnixTime::now())
        .is_ok()
}

fn data(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// First start creates the namespace and both Secrets (seed names and keys); a second start
/// reuses them; a leaf inside its renewal window is renewed under the same CA, so the
/// `ca.crt` an operator copied into the BuildPlane stays valid.
/// (Fails with OpenChoreo's self-signed pinned leaf: the renewed leaf would not verify.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_reuse_and_renewal_under_the_same_ca() {
    buildplane_pki::install_crypto_provider();
    let server = Server::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();

    let first = identity::ensure(&client, NS, "plane-1", DAY, Duration::from_secs(3600))
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(namespaces.get_opt(NS).await.unwrap().is_some());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let tls = secrets.get(names::AGENT_TLS_SECRET).await.unwrap();
    let ca = secrets.get(names::AGENT_CA_KEY_SECRET).await.unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(!data(&tls, key).is_empty(), "{key} in cluster-agent-tls");
    }
    assert!(data(&ca, "ca.key").contains("PRIVATE KEY"));
    assert!(
        !tls.data.as_ref().unwrap().contains_key("ca.key"),
        "the CA key stays out of the TLS Secret"
    );
    let published_ca = data(&tls, "ca.crt");
    assert!(verifies(&published_ca, &first.leaf.cert_pem));

    let again = identity::ensure(&client, NS, "plane-1", DAY, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(again.leaf.cert_pem, first.leaf.cert_pem, "reused");

    // Renew when the leaf expires within `renew_before` (here: always).
    let renewed = identity::ensure(&client, NS, "plane-1", DAY, DAY * 2)
        .await
        .unwrap();
    assert_ne!(renewed.leaf.cert_pem, first.leaf.cert_pem, "renewed");
    assert_eq!(renewed.ca_bundle_pem, published_ca, "same CA published");
    assert!(verifies(&published_ca, &renewed.leaf.cert_pem));
}

/// CA rotation: start publishes old+new CA and switches the leaf to the new CA (valid under the
/// bundle, so a BuildPlane carrying the bundle admits both old and new leaves); finish drops
/// the old CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_publishes_a_bundle_then_drops_the_old_ca() {
    buildplane_pki::install_crypto_provider();
    let server = Server::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    let before = identity::ensure(&client, NS, "p", DAY, Duration::from_secs(3600))
        .await
        .unwrap();
    let old_ca = before.ca_bundle_pem.clone();

    let bundle = identity::rotate_ca(&client, NS, "p", false, DAY)
        .await
        .unwrap();
    assert!(bundle.starts_with(old_ca.trim()), "old CA first");
    assert_eq!(parse_cert_bundle(bundle.as_bytes()).unwrap().len(), 2);
    let during = identity::ensure(&client, NS, "p", DAY, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(during.ca_bundle_pem, bundle);
    assert!(
        !verifies(&old_ca, &during.leaf.cert_pem),
        "leaf on the new CA"
    );
    assert!(verifies(&bundle, &during.leaf.cert_pem));
    assert!(verifies(&bundle, &before.leaf.cert_pem));

    let finished = identity::rotate_ca(&client, NS, "p", true, DAY)
        .await
        .unwrap();
    assert_eq!(parse_cert_bundle(finished.as_bytes()).unwrap().len(), 1);
    assert!(verifies(&finished, &during.leaf.cert_pem));
    assert!(!verifies(&finished, &before.leaf.cert_pem));
}

/// A client that counts the plain GETs it sends (not lists or watches).
fn counting_client(config: kube::Config, gets: Arc<AtomicUsize>) -> kube::Client {
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let is_watch = req.uri().query().is_some_and(|q| q.contains("watch="));
        let names_one = req
            .uri()
            .path()
            .rsplit('/')
            .nth(1)
            .is_some_and(|p| p == "secrets" || p == "namespaces");
        if req.method() == http::Method::GET && !is_watch && names_one {
            gets.fetch_add(1, Ordering::SeqCst);
        }
        req
    });
    kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&count)
        .build()
}

/// The identity follower watches the two Secrets instead of reading them every 2 s: while
/// nothing changes it sends no request at all (the poll loop read the namespace and both
/// Secrets every 2 s), and `cluster-agent renew` (another process writing the Secret) is
/// picked up at once through the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_watches_the_secrets_instead_of_polling() {
    buildplane_pki::install_crypto_provider();
    let server = Server::start(Config::default()).await.unwrap();
    let admin = server.client().await.unwrap();
    identity::ensure(&admin, NS, "p", DAY, Duration::from_secs(3600))
        .await
        .unwrap();
    let gets = Arc::new(AtomicUsize::new(0));
    let client = counting_client(server.client_config().await.unwrap(), gets.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        identity::follow(
            &client,
            NS,
            "p",
            DAY,
            Duration::from_secs(3600),
            |identity| {
                let _ = tx.send(identity.leaf.cert_pem);
            },
        )
        .await
    });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the first identity")
        .unwrap();
    // Both watches have listed; let their start settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while rx.try_recv().is_ok() {}

    let before = gets.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        gets.load(Ordering::SeqCst) - before,
        0,
        "no reads while nothing changes"
    );

    let ca = identity::load_ca(&admin, NS).await.unwrap();
    let renewed = identity::renew(&admin, NS, "p", &ca, DAY).await.unwrap();
    assert_ne!(renewed.leaf.cert_pem, first);
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let pem = rx.recv().await.unwrap();
            if pem == renewed.leaf.cert_pem {
                return pem;
            }
        }
    })
    .await
    .expect("the renewed leaf was picked up");
    assert_eq!(seen, renewed.leaf.cert_pem);
    follower.abort();
}

/// With nothing else changing, the follower renews the leaf when it is due (`renew_before`
/// ahead of its expiry), and again for the renewed leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_renews_the_leaf_when_due() {
    buildplane_pki::install_crypto_provider();
    let server = Server::start(Config::default()).await.unwrap();
    let client = server.client().await.unwrap();
    let validity = Duration::from_secs(4);
    let renew_before = Duration::from_secs(2);
    let start = identity::ensure(&client, NS, "p", validity, renew_before)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        identity::follow(&client, NS, "p", validity, renew_before, |identity| {
            let _ = tx.send(identity.leaf.cert_pem);
        })
        .await
    });
    let mut leaves = vec![start.leaf.cert_pem];
    tokio::time::timeout(Duration::from_secs(10), async {
        while leaves.len() < 3 {
            let pem = rx.recv().await.unwrap();
            if leaves.last() != Some(&pem) {
                leaves.push(pem);
            }
        }
    })
    .await
    .expect("two renewals within 10 s of 4 s leaves renewed 2 s before expiry");
    follower.abort();
}
