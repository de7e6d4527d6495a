//! Admission over real TLS and WebSockets: by CA and planeID, rejection reasons, shared planeIDs,
//! live grant/revoke when a CA Secret changes, deleting one CR of two.

mod common;

use std::time::Duration;

use buildplane_api::served::ServedCrs;
use buildplane_pki::Ca;
use cluster_gateway::agents::NOT_ACCEPTED;
use common::{DAY, Env, V2_FIRST, from_secret};

fn chain(leaf: &buildplane_pki::Leaf) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    buildplane_pki::parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("leaf PEM")
}

const WAIT: Duration = Duration::from_secs(10);

/// An agent whose leaf chains to the BuildPlane's clientCA and who dials that planeID is admitted
/// and serves proxied requests from the build cluster; agents with the wrong CA, an unknown
/// planeID, no certificate or a bad query are refused with the matching status (a 401 names
/// no CR: the reason is the gateway's, from `Trust::admit`).
/// (Fails if admission ignored the CA: the wrong-CA dial would get 101 instead of 401.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_by_ca_and_plane_id_with_reasons() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let other = Ca::generate("other-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "plane-1", ca.cert_pem())
        .await;

    let _agent = env.agent(&ca, "plane-1", 2);
    env.wait_proxy_status("plane-1", "org-a", "bp", 200, WAIT)
        .await;
    let (_, body) = env
        .proxy("plane-1", "org-a", "bp", "/api/v1/namespaces")
        .await;
    assert!(
        body.contains("NamespaceList"),
        "the build cluster answered: {body}"
    );

    let good = ca.issue_client("plane-1", DAY).unwrap();
    let wrong = other.issue_client("plane-1", DAY).unwrap();
    let (status, body) = env
        .raw_connect("?planeID=plane-1&planeType=buildplane", Some(&wrong), None)
        .await
        .map(drop)
        .expect_err("wrong CA refused");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body, NOT_ACCEPTED, "the reason is not told to the caller");
    let reasons = env
        .shared()
        .trust
        .admit("plane-1", &chain(&wrong), &ServedCrs::any())
        .refused;
    assert!(
        format!("{reasons:?}").contains("bp"),
        "the gateway's reason names the CR: {reasons:?}"
    );

    let (status, body) = env
        .raw_connect("?planeID=nobody&planeType=buildplane", Some(&good), None)
        .await
        .map(drop)
        .expect_err("unknown planeID refused");
    assert_eq!(status, 401);
    assert_eq!(
        body, NOT_ACCEPTED,
        "an unknown planeID looks like any refusal"
    );

    let (status, body) = env
        .raw_connect("?planeID=plane-1&planeType=buildplane", None, None)
        .await
        .map(drop)
        .expect_err("no certificate refused");
    assert_eq!(status, 401);
    assert!(body.contains("certificate required"), "{body}");

    let (status, _) = env
        .raw_connect("?planeType=buildplane", Some(&good), None)
        .await
        .map(drop)
        .expect_err("missing planeID refused");
    assert_eq!(status, 400);
    let (status, _) = env
        .raw_connect("?planeID=plane-1&planeType=rocket", Some(&good), None)
        .await
        .map(drop)
        .expect_err("bad planeType refused");
    assert_eq!(status, 400);

    // An expired leaf from the right CA is refused with the reason.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = ca
        .issue_client_with(
            "plane-1",
            buildplane_pki::Validity {
                not_before: now - 2 * 86_400,
                not_after: now - 86_400,
            },
            &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        )
        .unwrap();
    let (status, body) = env
        .raw_connect(
            "?planeID=plane-1&planeType=buildplane",
            Some(&expired),
            None,
        )
        .await
        .map(drop)
        .expect_err("expired leaf refused");
    assert_eq!(status, 401);
    assert_eq!(body, NOT_ACCEPTED);
    let reasons = env
        .shared()
        .trust
        .admit("plane-1", &chain(&expired), &ServedCrs::any())
        .refused;
    assert!(
        format!("{reasons:?}").contains("expired"),
        "the gateway's reason: {reasons:?}"
    );

    // Subprotocol negotiation: v2 preferred, v1 when only v1 offered, v1 without a header.
    let (_, protocol) = env
        .raw_connect(
            "?planeID=plane-1&planeType=buildplane",
            Some(&good),
            Some(V2_FIRST),
        )
        .await
        .expect("admitted");
    assert_eq!(protocol.as_deref(), Some("buildplane.tunnel.v2"));
    let (_, protocol) = env
        .raw_connect(
            "?planeID=plane-1&planeType=buildplane",
            Some(&good),
            Some("buildplane.tunnel.v1"),
        )
        .await
        .expect("admitted");
    assert_eq!(protocol.as_deref(), Some("buildplane.tunnel.v1"));
}

/// Two BuildPlanes in different namespaces share a planeID and CA: one agent serves both. A
/// third CR with the same planeID but another CA gets 403 NotAuthorized; an unknown plane 503
/// with OpenChoreo's words (`no agents found for plane <planeType>/<planeID>`).
/// (Fails if authorisation were per planeID instead of per CR: the third CR would get 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_plane_id_routes_both_crs_and_refuses_a_third_ca() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let other = Ca::generate("other-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "shared", ca.cert_pem())
        .await;
    env.build_plane("org-b", "bp", "shared", ca.cert_pem())
        .await;
    env.build_plane("org-c", "bp", "shared", other.cert_pem())
        .await;
    env.cluster_build_plane("cluster-bp", "shared", ca.cert_pem())
        .await;
    let _agent = env.agent(&ca, "shared", 2);
    env.wait_proxy_status("shared", "org-a", "bp", 200, WAIT)
        .await;
    env.wait_proxy_status("shared", "org-b", "bp", 200, WAIT)
        .await;
    env.wait_proxy_status("shared", "_cluster", "cluster-bp", 200, WAIT)
        .await;
    let (status, body) = env
        .proxy("shared", "org-c", "bp", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("NotAuthorized"), "{body}");
    let (status, body) = env
        .proxy("elsewhere", "org-a", "bp", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NoAgentConnected"), "{body}");
    // OpenChoreo's words (its status is 502; ours stays 503: CONTRACTS.md), under the
    // planeType the caller named.
    assert!(
        body.contains("proxy request failed: no agents found for plane buildplane/elsewhere"),
        "{body}"
    );
    let (status, body) = env
        .get("/api/proxy/workflowplane/elsewhere/org-a/bp/k8s/api/v1/namespaces")
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no agents found for plane workflowplane/elsewhere"),
        "{body}"
    );
    assert_eq!(
        env.connected_agents("shared", Some(("org-a", "bp"))).await,
        1
    );
    assert_eq!(
        env.connected_agents("shared", Some(("org-c", "bp"))).await,
        0
    );
}

/// A CR whose clientCA comes from a Secret (namespace defaulting to the CR's) is granted to a
/// live connection when the Secret gains the right CA and revoked when it loses it, while the
/// connection stays up for its other CR. (Fails without the Secret reflector: no grant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_ca_change_grants_and_revokes_live() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    let other = Ca::generate("other-ca", DAY).unwrap();
    env.build_plane("org-a", "direct", "p", ca.cert_pem()).await;
    env.secret("org-b", "agent-ca", "ca.crt", other.cert_pem())
        .await;
    env.build_plane_from(
        "org-b",
        "via-secret",
        "p",
        from_secret("agent-ca", None, "ca.crt"),
    )
    .await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "direct", 200, WAIT)
        .await;
    let (status, _) = env
        .proxy("p", "org-b", "via-secret", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 403);
    let connections = env.connections().await;

    env.secret("org-b", "agent-ca", "ca.crt", ca.cert_pem())
        .await;
    env.wait_proxy_status("p", "org-b", "via-secret", 200, Duration::from_secs(5))
        .await;
    assert_eq!(
        env.connections().await,
        connections,
        "granted live, no reconnect"
    );

    env.secret("org-b", "agent-ca", "ca.crt", other.cert_pem())
        .await;
    env.wait_proxy_status("p", "org-b", "via-secret", 403, Duration::from_secs(5))
        .await;
    let (status, _) = env
        .proxy("p", "org-a", "direct", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 200, "the sibling CR keeps its agent");

    // The last CR revoked: the connection is closed (and the agent is refused on reconnect).
    env.build_plane("org-a", "direct", "p", other.cert_pem())
        .await;
    env.eventually("the connection closed", Duration::from_secs(5), || async {
        env.connections().await == 0
    })
    .await;
}

/// Deleting one of two CRs sharing a planeID revokes only that one; the same connection keeps
/// serving the sibling. `notify deleted` revokes at once, before the reflector sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_one_cr_leaves_its_sibling_connected() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    env.build_plane("org-b", "bp", "p", ca.cert_pem()).await;
    let _agent = env.agent(&ca, "p", 2);
    env.wait_proxy_status("p", "org-a", "bp", 200, WAIT).await;
    env.wait_proxy_status("p", "org-b", "bp", 200, WAIT).await;
    let before: serde_json::Value =
        serde_json::from_str(&env.get("/api/v1/connections").await.1).unwrap();

    // A plane type this gateway does not serve is refused, and revokes nothing.
    let wrong = env
        .http
        .post(format!("{}/api/v1/planes/notify", env.base))
        .json(&serde_json::json!({"planeType": "dataplane", "planeID": "p", "event": "deleted", "namespace": "org-a", "name": "bp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);
    let (status, _) = env.proxy("p", "org-a", "bp", "/api/v1/namespaces").await;
    assert_eq!(status, 200, "a refused notify changed nothing");

    let res = env
        .http
        .post(format!("{}/api/v1/planes/notify", env.base))
        .json(&serde_json::json!({"planeType": "buildplane", "planeID": "p", "event": "deleted", "namespace": "org-a", "name": "bp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["success"], true);
    assert_eq!(answer["authorizationsRevoked"], 1, "{answer}");
    let (status, _) = env.proxy("p", "org-a", "bp", "/api/v1/namespaces").await;
    assert_eq!(status, 403, "revoked at once by notify");
    env.delete_build_plane("org-a", "bp").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = env.proxy("p", "org-b", "bp", "/api/v1/namespaces").await;
    assert_eq!(status, 200);
    let after: serde_json::Value =
        serde_json::from_str(&env.get("/api/v1/connections").await.1).unwrap();
    assert_eq!(
        before["connections"][0]["id"], after["connections"][0]["id"],
        "the same connection serves on"
    );
    assert_eq!(
        after["connections"][0]["crs"],
        serde_json::json!(["org-b/bp"])
    );
}

/// Tenancy from the build cluster's side: an agent started with `--serve org-a/bp` is granted
/// org-a's CR and not org-b's, though org-b's CR holds a copy of the same public CA (a copy any
/// tenant can make); a copy created after the agent connected is not granted at re-verification
/// either; a malformed list is a 400 naming it. The same copy is granted to an agent that names
/// no list, which is what the list prevents. (Fails without the list: the copy routes 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_only_the_crs_it_names() {
    let mut env = Env::start().await;
    let ca = Ca::generate("agent-ca", DAY).unwrap();
    env.build_plane("org-a", "bp", "shared", ca.cert_pem())
        .await;
    env.build_plane("org-b", "copy", "shared", ca.cert_pem())
        .await;
    let _agent = env.agent_serving(&ca, "shared", "org-a/bp,_cluster/other");
    env.wait_proxy_status("shared", "org-a", "bp", 200, WAIT)
        .await;
    let (status, body) = env
        .proxy("shared", "org-b", "copy", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("NotAuthorized"), "{body}");
    assert_eq!(
        env.connected_agents("shared", Some(("org-b", "copy")))
            .await,
        0
    );

    // A copy made after the connection: re-verification runs and still leaves it out.
    let reverified = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("cluster_gateway_reverified_connections_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = reverified(&env.metrics().await);
    env.build_plane("org-c", "late-copy", "shared", ca.cert_pem())
        .await;
    env.eventually("re-verification after the new CR", WAIT, || async {
        reverified(&env.metrics().await) > before
    })
    .await;
    let (status, body) = env
        .proxy("shared", "org-c", "late-copy", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = env
        .proxy("shared", "org-a", "bp", "/api/v1/namespaces")
        .await;
    assert_eq!(status, 200);

    // A malformed list is refused before admission, with the entry in the reason.
    let leaf = ca.issue_client("shared", DAY).unwrap();
    let refused = env
        .raw_connect(
            "?planeID=shared&planeType=buildplane&serves=Org-A%2Fbp",
            Some(&leaf),
            None,
        )
        .await
        .expect_err("a bad serves list is refused");
    assert_eq!(refused.0, 400, "{refused:?}");
    assert!(refused.1.contains("Org-A/bp"), "{refused:?}");

    // The control: an agent that names no list is granted the copies too.
    let _open = env.agent(&ca, "shared", 2);
    env.wait_proxy_status("shared", "org-b", "copy", 200, WAIT)
        .await;
}
