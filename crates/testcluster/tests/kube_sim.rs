//! The conformance check against kube-sim: runs everywhere, so the check itself is known to
//! work (and to fail: see `common`) before the workflow runs it against k3s.

mod common;

#[tokio::test]
async fn buildplane_api_on_kube_sim() {
    let server = kube_sim::Server::start(kube_sim::Config::default())
        .await
        .expect("kube-sim starts");
    // Through this crate's kubeconfig path, as the k3s test does.
    let client = buildplane_testcluster::kubeconfig::client(&server.kubeconfig_yaml())
        .await
        .expect("client from the kubeconfig");
    common::buildplane_api_conformance(&client, "default").await;
    server.shutdown().await;
}
