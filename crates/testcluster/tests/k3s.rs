//! Real k3s (testcontainers' K3s module). They need a Docker engine, so a plain `cargo test`
//! reports them as ignored with that reason (never as passed); `cargo test -p
//! buildplane-testcluster -- --include-ignored` runs them, and then a missing engine or image
//! list is a failure. `.github/workflows/e2e.yml` runs them so, with the k3s version from its
//! matrix and our images preloaded.

mod common;

use buildplane_testcluster::{IMAGES_ENV, K3sCluster, K3sOptions};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

#[tokio::test]
#[ignore = "needs a Docker engine for k3s: run with --include-ignored where Docker is"]
async fn buildplane_api_on_k3s() {
    let cluster = K3sCluster::start(K3sOptions::from_env())
        .await
        .expect("k3s starts");
    common::buildplane_api_conformance(cluster.client(), "default").await;
}

/// The images named in BUILDPLANE_TEST_IMAGES are on the node without any registry.
#[tokio::test]
#[ignore = "needs a Docker engine and our images in BUILDPLANE_TEST_IMAGES: run with --include-ignored where they are"]
async fn our_images_are_preloaded() {
    let options = K3sOptions::from_env();
    assert!(
        !options.images.is_empty(),
        "set {IMAGES_ENV} to local images (built from the Dockerfile) to check that the cluster \
         gets them"
    );
    let wanted = options.images.clone();
    let cluster = K3sCluster::start(options).await.expect("k3s starts");
    // k3s imports the tarballs while it starts; the kubelet reports them on the node shortly
    // after, so poll rather than read once.
    let nodes: Api<Node> = Api::all(cluster.client().clone());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let listed = nodes.list(&ListParams::default()).await.expect("nodes");
        let names: Vec<String> = listed
            .items
            .iter()
            .flat_map(|n| n.status.iter().flat_map(|s| s.images.iter().flatten()))
            .flat_map(|i| i.names.iter().flatten().cloned())
            .collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| {
                !names
                    .iter()
                    .any(|n| n == *w || n.ends_with(&format!("/{w}")))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "images {missing:?} not on the node; it has {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
