//! The controller against kube-sim with the real gateway and in-process agents (the gateway's
//! own test fixture): status follows agents through the gateway's event stream, Secret edits
//! rotate trust, deletion revokes one CR only, restarts do not churn status, and two replicas
//! elect one leader.
//!
//! The controller's periodic resync is 5 minutes, so every wait below (at most 15 s) can only
//! pass through the event-driven paths these tests are about.

#[path = "../../gateway/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use buildplane_api::{BuildPlane, names};
use buildplane_controller::{Config, RunningController, leader::LeaseConfig};
use buildplane_pki::Ca;
use common::{Env, from_secret};
use kube::Api;

const WAIT: Duration = Duration::from_secs(15);
/// CAs valid for a year: a one-day CA is `CAExpiresSoon`, whose message counts days and may tick
/// from "1 day(s)" to "0 day(s)" in the middle of a test.
const YEAR: Duration = Duration::from_secs(365 * 86_400);

fn controller_config(env: &Env) -> Config {
    let kubeconfig = env.dir.path().join("control.kubeconfig");
    let (cert, key, ca) = env.internal_client_files.clone();
    Config {
        kubeconfig: Some(kubeconfig),
        gateway_url: Some(env.base.clone()),
        gateway_tls: Some((cert, key, ca)),
        health_listen: Some("127.0.0.1:0".parse().unwrap()),
        leader: None,
        disconnect_grace: Duration::from_millis(500),
    }
}

async fn start_controller(config: Config) -> RunningController {
    buildplane_controller::start(config)
        .await
        .expect("controller started")
}

async fn get(env: &Env, ns: &str, name: &str) -> Option<BuildPlane> {
    Api::<BuildPlane>::namespaced(env.control_client.clone(), ns)
        .get_opt(name)
        .await
        .expect("get BuildPlane")
}

/// `(AgentConnected status, connectedAgents)` of a BuildPlane, if it has a status.
async fn agent_status(env: &Env, ns: &str, name: &str) -> Option<(String, i32)> {
    let bp = get(env, ns, name).await?;
    let status = bp.status?;
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == names::condition::AGENT_CONNECTED)?;
    let agents = status.agent_connection.map_or(0, |c| c.connected_agents);
    Some((condition.status.clone(), agents))
}

async fn condition_reason(env: &Env, ns: &str, name: &str, type_: &str) -> Option<String> {
    get(env, ns, name)
        .await?
        .status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

async fn wait_agents(env: &Env, ns: &str, name: &str, want: (&str, i32)) {
    let what = format!(
        "{ns}/{name} AgentConnected={} with {} agents",
        want.0, want.1
    );
    env.eventually(&what, WAIT, || async {
        agent_status(env, ns, name).await == Some((want.0.to_owned(), want.1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_agent_and_deletion_spares_the_sibling() {
    let mut env = Env::start().await;
    let controller = start_controller(controller_config(&env)).await;
    let ca = Ca::generate("agent-ca", YEAR).unwrap();
    // The seed's multi-tenant example: two organisations share one planeID.
    env.build_plane("org-a", "bp", "shared-builder", ca.cert_pem())
        .await;
    env.build_plane("org-b", "bp", "shared-builder", ca.cert_pem())
        .await;
    wait_agents(&env, "org-a", "bp", ("False", 0)).await;
    let bp = get(&env, "org-a", "bp").await.unwrap();
    assert!(
        bp.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&names::FINALIZER.to_owned()),
        "the controller adds its finalizer"
    );

    env.agent(&ca, "shared-builder", 2);
    wait_agents(&env, "org-a", "bp", ("True", 1)).await;
    wait_agents(&env, "org-b", "bp", ("True", 1)).await;
    assert_eq!(
        condition_reason(&env, "org-a", "bp", names::condition::READY).await,
        Some(names::reason::AGENTS_CONNECTED.into())
    );

    // Deleting org-a's CR runs the finalizer (the object goes away) and revokes that CR only.
    env.delete_build_plane("org-a", "bp").await;
    env.eventually("org-a/bp deleted", WAIT, || async {
        get(&env, "org-a", "bp").await.is_none()
    })
    .await;
    env.wait_proxy_status("shared-builder", "org-b", "bp", 200, WAIT)
        .await;
    assert_eq!(
        agent_status(&env, "org-b", "bp").await,
        Some(("True".into(), 1))
    );
    assert_eq!(env.connections().await, 1, "the agent stayed connected");

    // The agent leaving shows after the grace period.
    env.stop_agents();
    wait_agents(&env, "org-b", "bp", ("False", 0)).await;
    controller.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_ca_secret_rotates_trust() {
    let mut env = Env::start().await;
    let controller = start_controller(controller_config(&env)).await;
    let old = Ca::generate("old-ca", YEAR).unwrap();
    let new = Ca::generate("new-ca", YEAR).unwrap();
    env.secret("org-a", "agent-ca", "ca.crt", old.cert_pem())
        .await;
    env.build_plane_from("org-a", "bp", "p", from_secret("agent-ca", None, "ca.crt"))
        .await;
    env.agent(&old, "p", 2);
    wait_agents(&env, "org-a", "bp", ("True", 1)).await;

    // A bundle of both CAs keeps the old agent and admits one on the new CA.
    let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
    env.secret("org-a", "agent-ca", "ca.crt", &bundle).await;
    env.agent(&new, "p", 2);
    wait_agents(&env, "org-a", "bp", ("True", 2)).await;

    // Only the new CA: the agent left on the old one is dropped.
    env.secret("org-a", "agent-ca", "ca.crt", new.cert_pem())
        .await;
    wait_agents(&env, "org-a", "bp", ("True", 1)).await;

    // A Secret that no longer parses is a condition with its reason, not a crash.
    env.secret("org-a", "agent-ca", "ca.crt", "not a certificate")
        .await;
    env.eventually("ClientCAResolved=InvalidPEM", WAIT, || async {
        condition_reason(&env, "org-a", "bp", names::condition::CLIENT_CA_RESOLVED).await
            == Some(names::reason::INVALID_PEM.into())
    })
    .await;
    // Deleting the Secret is another reason.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.control_client.clone(), "org-a");
    secrets
        .delete("agent-ca", &Default::default())
        .await
        .expect("Secret deleted");
    env.eventually("ClientCAResolved=SecretNotFound", WAIT, || async {
        condition_reason(&env, "org-a", "bp", names::condition::CLIENT_CA_RESOLVED).await
            == Some(names::reason::SECRET_NOT_FOUND.into())
    })
    .await;
    controller.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_writes_nothing() {
    let mut env = Env::start().await;
    let controller = start_controller(controller_config(&env)).await;
    let ca = Ca::generate("agent-ca", YEAR).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    env.agent(&ca, "p", 2);
    wait_agents(&env, "org-a", "bp", ("True", 1)).await;
    // Let trailing writes (events, the heartbeat time) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = get(&env, "org-a", "bp").await.unwrap();
    controller.shutdown().await.expect("clean shutdown");

    let restarted = start_controller(controller_config(&env)).await;
    env.eventually("the new controller reconciled", WAIT, || async {
        // At least the initial reconcile (the snapshot's resync may fold into it).
        restarted.metrics.reconciles() >= 1
    })
    .await;
    // Give the gateway snapshot's resync time to land too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = get(&env, "org-a", "bp").await.unwrap();
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "status churned on restart: {:#?} -> {:#?}",
        before.status, after.status
    );
    restarted.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader() {
    let env = Env::start().await;
    let lease = |identity: &str| LeaseConfig {
        namespace: "org-c".into(),
        name: "buildplane-controller".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        renew_every: Duration::from_millis(300),
    };
    let mut first = controller_config(&env);
    first.leader = Some(lease("replica-1"));
    let mut second = controller_config(&env);
    second.leader = Some(lease("replica-2"));
    let one = start_controller(first).await;
    let two = start_controller(second).await;
    env.eventually("a leader", WAIT, || async {
        one.is_leader() || two.is_leader()
    })
    .await;
    // Several renewals later there is still exactly one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        one.is_leader() != two.is_leader(),
        "exactly one leader: {} {}",
        one.is_leader(),
        two.is_leader()
    );
    let (leader, standby) = if one.is_leader() {
        (one, two)
    } else {
        (two, one)
    };
    // The standby does not reconcile; once the leader steps down (releasing the lease) it takes
    // over well before the 15 s lease would expire, and reconciles.
    let ca = Ca::generate("agent-ca", YEAR).unwrap();
    env.build_plane("org-a", "bp", "p", ca.cert_pem()).await;
    wait_agents(&env, "org-a", "bp", ("False", 0)).await;
    assert_eq!(standby.metrics.reconciles(), 0, "the standby reconciled");
    leader.shutdown().await.expect("clean shutdown");
    env.eventually("the standby leads", Duration::from_secs(10), || async {
        standby.is_leader()
    })
    .await;
    env.eventually("the new leader reconciles", WAIT, || async {
        standby.metrics.reconciles() > 0
    })
    .await;
    standby.shutdown().await.expect("clean shutdown");
}
