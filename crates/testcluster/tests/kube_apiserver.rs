//! The conformance check against a real kube-apiserver (etcd, kube-apiserver and
//! kube-controller-manager as local processes, built by `cargo xtask peers build`), so kube-sim's
//! answers are held to the real server on every CI run, not only where Docker runs k3s.

mod common;

#[tokio::test]
#[ignore = "needs the real cluster programs: cargo xtask peers build (CI runs it with --include-ignored)"]
async fn buildplane_api_on_kube_apiserver() {
    let cluster = buildplane_peers::LocalCluster::start("testcluster")
        .await
        .expect("a real cluster starts");
    // Through this crate's kubeconfig path, as the k3s test does.
    let client = buildplane_testcluster::kubeconfig::client(&cluster.kubeconfig_yaml())
        .await
        .expect("client from the kubeconfig");
    common::buildplane_api_conformance(&client, "default").await;
    cluster.shutdown().await;
}
