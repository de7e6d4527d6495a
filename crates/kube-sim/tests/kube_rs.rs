//! kube-rs against kube-sim: typed CRUD, conflicts, watchers through 410 and restarts.

use std::time::Duration;

use buildplane_api::{BuildPlane, BuildPlaneSpec, ClusterAgentConfig, ValueFrom};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use kube_sim::{Config, RunningServer, Server};

async fn with_crds(server: &RunningServer) -> Client {
    let client = server.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in buildplane_api::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("CRD created");
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("org".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    client
}

fn build_plane(name: &str, plane_id: &str) -> BuildPlane {
    BuildPlane::new(
        name,
        BuildPlaneSpec {
            plane_id: Some(plane_id.into()),
            cluster_agent: ClusterAgentConfig {
                client_ca: ValueFrom {
                    secret_ref: None,
                    value: Some("pem".into()),
                },
            },
            secret_store_ref: None,
            observability_plane_ref: None,
        },
    )
}

/// Create, get, list, patch (spec and status), replace with a stale version, delete.
#[tokio::test]
async fn typed_crud_round_trip() {
    let server = Server::start(Config::default()).await.expect("starts");
    let client = with_crds(&server).await;
    let api: Api<BuildPlane> = Api::namespaced(client, "org");
    let created = api
        .create(&PostParams::default(), &build_plane("bp", "p1"))
        .await
        .expect("created");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    let patched = api
        .patch("bp", &PatchParams::apply("test").force(), &Patch::Apply(serde_json::json!({
            "apiVersion": "openchoreo.dev/v1alpha1", "kind": "BuildPlane", "spec": {"planeID": "p2", "clusterAgent": {"clientCA": {"value": "pem"}}}
        })))
        .await
        .expect("applied");
    assert_eq!(patched.spec.plane_id.as_deref(), Some("p2"));
    assert_eq!(patched.metadata.generation, Some(2));
    let status = api
        .patch_status(
            "bp",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"observedGeneration": 2}})),
        )
        .await
        .expect("status patched");
    assert_eq!(
        status.metadata.generation,
        Some(2),
        "status writes do not bump generation"
    );
    let mut stale = created.clone();
    stale.spec.plane_id = Some("p3".into());
    let err = api
        .replace("bp", &PostParams::default(), &stale)
        .await
        .expect_err("stale resourceVersion");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    let err = api
        .create(&PostParams::default(), &build_plane("bp", "p1"))
        .await
        .expect_err("exists");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    assert_eq!(
        api.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    api.delete("bp", &DeleteParams::default())
        .await
        .expect("deleted");
    let err = api.get("bp").await.expect_err("gone");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
    server.shutdown().await;
}

/// Finalizers hold a deletion until they are removed.
#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = Server::start(Config::default()).await.expect("starts");
    let client = with_crds(&server).await;
    let api: Api<BuildPlane> = Api::namespaced(client, "org");
    let mut bp = build_plane("held", "p");
    bp.metadata.finalizers = Some(vec!["openchoreo.dev/buildplane-cleanup".into()]);
    api.create(&PostParams::default(), &bp)
        .await
        .expect("created");
    api.delete("held", &DeleteParams::default())
        .await
        .expect("delete accepted");
    let marked = api.get("held").await.expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": []}})),
    )
    .await
    .expect("finalizer removed");
    assert!(
        api.get_opt("held").await.expect("get").is_none(),
        "removed once the finalizers are gone"
    );
    server.shutdown().await;
}

/// Racing writers on one object: exactly one success per resourceVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_one_success_per_version() {
    let server = Server::start(Config::default()).await.expect("starts");
    let client = server.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("race".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    let base = api
        .create(&PostParams::default(), &cm)
        .await
        .expect("created");
    let writers = (0..16).map(|i| {
        let api = api.clone();
        let mut cm = base.clone();
        cm.data = Some([("writer".to_owned(), i.to_string())].into());
        tokio::spawn(async move {
            api.replace("race", &PostParams::default(), &cm)
                .await
                .is_ok()
        })
    });
    let results = futures::future::join_all(writers).await;
    let n_ok = results
        .into_iter()
        .filter(|r| *r.as_ref().expect("joined"))
        .count();
    assert_eq!(n_ok, 1, "every writer used the same resourceVersion");
    server.shutdown().await;
}

/// A kube-rs watcher sees create, update and delete, and re-lists after a forced 410.
#[tokio::test]
async fn watcher_sees_changes_and_survives_410() {
    let server = Server::start(Config::default()).await.expect("starts");
    let client = with_crds(&server).await;
    let api: Api<BuildPlane> = Api::namespaced(client, "org");
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    api.create(&PostParams::default(), &build_plane("w", "p1"))
        .await
        .expect("created");
    let seen = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("event in time")
        .expect("ok");
    assert_eq!(seen.expect("object").name_any(), "w");
    // Force the watch to resume from a compacted version: the watcher must re-list.
    server.compact();
    server.close_watches();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"planeID": "p2"}})),
    )
    .await
    .expect("patched");
    let updated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let bp = events
                .try_next()
                .await
                .expect("watch ok")
                .expect("stream open");
            if bp.spec.plane_id.as_deref() == Some("p2") {
                return bp;
            }
        }
    })
    .await
    .expect("the watcher recovered from 410 and saw the update");
    assert_eq!(updated.metadata.generation, Some(2));
    server.shutdown().await;
}

/// With a data directory, acknowledged writes survive a restart and watchers resume.
#[tokio::test]
async fn data_dir_survives_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };
    let server = Server::start(config.clone()).await.expect("starts");
    let addr = server.addr();
    let client = with_crds(&server).await;
    let api: Api<BuildPlane> = Api::namespaced(client.clone(), "org");
    api.create(&PostParams::default(), &build_plane("durable", "p1"))
        .await
        .expect("created");
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let _ = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("initial event");
    server.shutdown().await;

    let restarted = Server::start(Config {
        listen: addr,
        ..config
    })
    .await
    .expect("restarts on the same port");
    let after = api
        .get("durable")
        .await
        .expect("the object survived with the same kubeconfig");
    assert_eq!(after.spec.plane_id.as_deref(), Some("p1"));
    api.patch(
        "durable",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"planeID": "p9"}})),
    )
    .await
    .expect("patched after restart");
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let bp = events
                .try_next()
                .await
                .expect("watch ok")
                .expect("stream open");
            if bp.spec.plane_id.as_deref() == Some("p9") {
                return bp;
            }
        }
    })
    .await
    .expect("the watcher reconnected after the restart");
    assert_eq!(seen.name_any(), "durable");
    restarted.shutdown().await;
}
