//! kube-rs against kube-sim: CRUD on dynamic objects, conflicts, server-side apply, pages, dry
//! runs, discovery, watchers through 410s and restarts, and a `Controller` reconciling.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    TestServer, bp_api, build_plane, build_planes, create_namespace, start, start_sim, with_crds,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{
        DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
        ValidationDirective,
    },
    runtime::{Controller, controller::Action, watcher, watcher::Event},
};
use kube_sim::{Config, Server};
use serde_json::json;

fn api_error(err: &kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone(), status.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Create, get, list, apply, status patch, stale replace, duplicate create, delete.
/// (Fails if generation, uid, conflicts or status isolation are wrong.)
#[tokio::test]
async fn crud_round_trip_with_dynamic_objects() {
    let server = start().await;
    let api = bp_api(&with_crds(&server).await);
    let created = api
        .create(&PostParams::default(), &build_plane("bp", "p1"))
        .await
        .expect("created");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let applied = api
        .patch(
            "bp",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({
                "apiVersion": "openchoreo.dev/v1alpha1", "kind": "BuildPlane",
                "spec": {"planeID": "p2", "clusterAgent": {"clientCA": {"value": "pem"}}}
            })),
        )
        .await
        .expect("applied");
    assert_eq!(applied.data["spec"]["planeID"], "p2");
    assert_eq!(applied.metadata.generation, Some(2));
    let status = api
        .patch_status(
            "bp",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"observedGeneration": 2}, "spec": {"planeID": "ignored"}}),
            ),
        )
        .await
        .expect("status patched");
    assert_eq!(
        status.metadata.generation,
        Some(2),
        "status writes do not bump generation"
    );
    assert_eq!(
        status.data["spec"]["planeID"], "p2",
        "the status subresource ignores spec"
    );
    let spec_with_status = api
        .patch(
            "bp",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 99}})),
        )
        .await
        .expect("patched");
    assert_eq!(
        spec_with_status.data["status"]["observedGeneration"], 2,
        "the main resource ignores status"
    );

    let mut stale = created.clone();
    stale.data["spec"]["planeID"] = json!("p3");
    let err = api
        .replace("bp", &PostParams::default(), &stale)
        .await
        .expect_err("stale resourceVersion");
    let (code, reason, message) = api_error(&err);
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{message}");
    assert!(
        message.contains("the object has been modified"),
        "{message}"
    );
    let mut unconditional = spec_with_status.clone();
    unconditional.metadata.resource_version = None;
    let err = api
        .replace("bp", &PostParams::default(), &unconditional)
        .await
        .expect_err("custom resources need a resourceVersion");
    assert_eq!(api_error(&err).0, 422);

    let err = api
        .create(&PostParams::default(), &build_plane("bp", "p1"))
        .await
        .expect_err("exists");
    assert_eq!(api_error(&err).1, "AlreadyExists");
    let mut generated = build_plane("", "p1");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = api
        .create(&PostParams::default(), &generated)
        .await
        .expect("generateName");
    assert!(generated.name_any().starts_with("gen-") && generated.name_any().len() == 9);
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    let selected = api
        .list(&ListParams::default().fields("metadata.name=bp"))
        .await
        .expect("field selector");
    assert_eq!(selected.items.len(), 1);
    api.delete("bp", &DeleteParams::default())
        .await
        .expect("deleted");
    let err = api.get("bp").await.expect_err("gone");
    assert_eq!(api_error(&err).0, 404);
    server.shutdown().await;
}

/// The 422 names the field with the real server's wording.
#[tokio::test]
async fn invalid_objects_get_the_servers_422() {
    let server = start().await;
    let api = bp_api(&with_crds(&server).await);
    let err = api
        .create(&PostParams::default(), &build_plane("x", "Bad"))
        .await
        .expect_err("invalid planeID");
    let (code, reason, message) = api_error(&err);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        r#"BuildPlane.openchoreo.dev "x" is invalid: spec.planeID: Invalid value: "Bad": spec.planeID in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#
    );
    let mut neither = build_plane("n", "ok");
    neither.data["spec"]["clusterAgent"]["clientCA"] = json!({});
    let err = api
        .create(&PostParams::default(), &neither)
        .await
        .expect_err("CEL");
    assert!(
        api_error(&err)
            .2
            .contains("exactly one of secretRef or value must be set")
    );
    // Server-side apply cannot build a typed patch with a field the schema does not declare:
    // 500 whatever fieldValidation says. A create prunes it (the default, Warn; kubectl's
    // `--validate=strict` test covers Strict).
    let typo = json!({"apiVersion": "openchoreo.dev/v1alpha1", "kind": "BuildPlane",
        "spec": {"planeId": "typo", "planeID": "ok", "clusterAgent": {"clientCA": {"value": "pem"}}}});
    for validation in [ValidationDirective::Strict, ValidationDirective::Warn] {
        let mut params = PatchParams::apply("t");
        params.field_validation = Some(validation);
        let err = api
            .patch("typo", &params, &Patch::Apply(&typo))
            .await
            .expect_err("apply with an undeclared field");
        let (code, _, message) = api_error(&err);
        assert_eq!(code, 500, "{err:?}");
        assert_eq!(
            message,
            "failed to create typed patch object (/; openchoreo.dev/v1alpha1, Kind=BuildPlane): .spec.planeId: field not declared in schema"
        );
    }
    let mut typo: DynamicObject = serde_json::from_value(typo).expect("object");
    typo.metadata.name = Some("typo".into());
    let pruned = api
        .create(&PostParams::default(), &typo)
        .await
        .expect("warned and pruned");
    assert!(pruned.data["spec"].get("planeId").is_none());
    server.shutdown().await;
}

/// Finalizers hold a deletion until they are removed.
#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = start().await;
    let api = bp_api(&with_crds(&server).await);
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
    let err = api
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["openchoreo.dev/buildplane-cleanup", "new"]}}),
            ),
        )
        .await
        .expect_err("no new finalizers while deleting");
    assert_eq!(api_error(&err).0, 422);
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
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
/// (Fails if updates do not compare resourceVersions atomically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_one_success_per_version() {
    let server = start().await;
    let client = server.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("race".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    let mut current = api
        .create(&PostParams::default(), &cm)
        .await
        .expect("created");
    for round in 0..5 {
        let writers = (0..16).map(|i| {
            let api = api.clone();
            let mut cm = current.clone();
            cm.data = Some([("writer".to_owned(), format!("{round}-{i}"))].into());
            tokio::spawn(async move { api.replace("race", &PostParams::default(), &cm).await })
        });
        let results = futures::future::join_all(writers).await;
        let mut winners = Vec::new();
        for result in results {
            match result.expect("joined") {
                Ok(cm) => winners.push(cm),
                Err(err) => assert_eq!(api_error(&err).0, 409),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: every writer used the same resourceVersion"
        );
        current = api.get("race").await.expect("get");
        assert_eq!(current.data, winners[0].data);
    }
    server.shutdown().await;
}

/// Pages with `limit`/`continue` cover every object once.
#[tokio::test]
async fn lists_page_with_limit_and_continue() {
    let server = start().await;
    let client = server.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..25 {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("cm-{i:02}")),
                labels: Some([("parity".to_owned(), (i % 2).to_string())].into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &cm)
            .await
            .expect("created");
    }
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(10).labels("parity=0");
    loop {
        let page = api.list(&params).await.expect("page");
        names.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let expected: Vec<String> = (0..25).step_by(2).map(|i| format!("cm-{i:02}")).collect();
    assert_eq!(names, expected);
    server.shutdown().await;
}

/// Dry runs validate and answer but store nothing.
#[tokio::test]
async fn dry_runs_store_nothing() {
    let server = start().await;
    let api = bp_api(&with_crds(&server).await);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry, &build_plane("dry", "p"))
        .await
        .expect("dry create");
    assert!(api.get_opt("dry").await.expect("get").is_none());
    let err = api
        .create(&dry, &build_plane("dry", "BAD"))
        .await
        .expect_err("still validated");
    assert_eq!(api_error(&err).0, 422);
    server.shutdown().await;
}

/// Server-side apply with two managers: a re-apply removes what the manager dropped, another
/// manager's change conflicts, force takes ownership.
#[tokio::test]
async fn server_side_apply_tracks_field_managers() {
    let server = start().await;
    let client = server.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let config = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": data});
    api.patch(
        "ssa",
        &PatchParams::apply("alice"),
        &Patch::Apply(config(json!({"a": "1", "b": "2"}))),
    )
    .await
    .expect("created by apply");
    api.patch(
        "ssa",
        &PatchParams::apply("bob"),
        &Patch::Apply(config(json!({"c": "3"}))),
    )
    .await
    .expect("bob applies his own field");
    let cm = api
        .patch(
            "ssa",
            &PatchParams::apply("alice"),
            &Patch::Apply(config(json!({"a": "1"}))),
        )
        .await
        .expect("alice drops b");
    let data = cm.data.clone().expect("data");
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["a", "c"],
        "b removed, bob's c kept"
    );
    // The real server orders entries by operation, then time to the second, then manager:
    // alice's second apply is newer than bob's unless both fall in the same second.
    let entries: Vec<(String, String)> = cm
        .managed_fields()
        .iter()
        .map(|m| {
            let time = m.time.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
            (format!("{time:020}"), m.manager.clone().unwrap_or_default())
        })
        .collect();
    let mut sorted = entries.clone();
    sorted.sort();
    assert_eq!(entries, sorted, "managedFields in the server's order");
    let mut managers: Vec<&str> = entries.iter().map(|(_, m)| m.as_str()).collect();
    managers.sort();
    assert_eq!(managers, ["alice", "bob"]);
    let err = api
        .patch(
            "ssa",
            &PatchParams::apply("bob"),
            &Patch::Apply(config(json!({"a": "9", "c": "3"}))),
        )
        .await
        .expect_err("conflict with alice");
    let (code, _, message) = api_error(&err);
    assert_eq!(code, 409);
    assert!(
        message.contains("conflict with \"alice\"") && message.contains(".data.a"),
        "{message}"
    );
    let forced = api
        .patch(
            "ssa",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(config(json!({"a": "9", "c": "3"}))),
        )
        .await
        .expect("forced");
    assert_eq!(forced.data.expect("data")["a"], "9");
    server.shutdown().await;
}

/// CRDs report Established and their kinds appear in kube-rs discovery.
#[tokio::test]
async fn crds_are_established_and_discovered() {
    let server = start().await;
    let client = with_crds(&server).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let crd = crds.get("buildplanes.openchoreo.dev").await.expect("crd");
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
    let discovery = kube::Discovery::new(client).run().await.expect("discovery");
    let group = discovery.get("openchoreo.dev").expect("group discovered");
    let kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    assert!(
        kinds.contains(&"BuildPlane".to_owned()) && kinds.contains(&"ClusterBuildPlane".to_owned()),
        "{kinds:?}"
    );
    server.shutdown().await;
}

/// How many 410 Expired watch errors the watchers of this test binary saw.
static EXPIRED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn next_event(
    events: &mut (impl futures::Stream<Item = Result<Event<DynamicObject>, watcher::Error>> + Unpin),
    what: &str,
    mut wanted: impl FnMut(&Event<DynamicObject>) -> bool,
) -> Event<DynamicObject> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await.expect("stream open") {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                // A watch resumed from a compacted version: the watcher re-lists.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    EXPIRED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(err) => panic!("watch failed: {err:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A kube-rs watcher sees create, update and delete, and re-lists after a forced 410.
#[tokio::test]
async fn watcher_sees_changes_and_survives_410() {
    // kube-sim's fault hooks force the 410; the real server has none (kube-sim only).
    let sim = start_sim().await;
    let faults = sim.faults();
    let server = TestServer::Sim(sim);
    let api = bp_api(&with_crds(&server).await);
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    next_event(&mut events, "the initial list", |e| {
        matches!(e, Event::InitDone)
    })
    .await;
    api.create(&PostParams::default(), &build_plane("w", "p1"))
        .await
        .expect("created");
    next_event(
        &mut events,
        "the creation",
        |e| matches!(e, Event::Apply(o) if o.name_any() == "w"),
    )
    .await;
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"planeID": "p2"}})),
    )
    .await
    .expect("patched");
    next_event(
        &mut events,
        "the update",
        |e| matches!(e, Event::Apply(o) if o.data["spec"]["planeID"] == "p2"),
    )
    .await;

    // Force the watch to resume from a compacted version: the watcher must re-list.
    faults.compact();
    assert!(faults.close_watches() >= 1, "the watch was open");
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"planeID": "p3"}})),
    )
    .await
    .expect("patched");
    next_event(
        &mut events,
        "the re-list after 410",
        |e| matches!(e, Event::InitApply(o) if o.data["spec"]["planeID"] == "p3"),
    )
    .await;
    assert!(
        EXPIRED.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the resumed watch got 410"
    );
    api.delete("w", &DeleteParams::default())
        .await
        .expect("deleted");
    next_event(
        &mut events,
        "the deletion",
        |e| matches!(e, Event::Delete(o) if o.name_any() == "w"),
    )
    .await;
    server.shutdown().await;
}

/// A streaming-list watcher (sendInitialEvents) gets the objects and the end bookmark.
#[tokio::test]
async fn streaming_list_watcher_gets_initial_events() {
    let server = start().await;
    let api = bp_api(&with_crds(&server).await);
    api.create(&PostParams::default(), &build_plane("existing", "p"))
        .await
        .expect("created");
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    if server.is_real() {
        // The real server here runs on Debian's etcd 3.4.23, which lacks the watch progress
        // requests streaming lists need (etcd 3.4.31+ or 3.5.13+); it refuses them, as any
        // kube-apiserver on such an etcd would. kube-sim behaves as one on a current etcd.
        let refused = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.next().await {
                    Some(Err(err)) => break err,
                    Some(Ok(_)) => continue,
                    None => panic!("the watcher ended without an error"),
                }
            }
        })
        .await
        .expect("the refusal within 30 s");
        let message = format!("{refused:?}");
        assert!(
            message.contains("RequestWatchProgress is disabled"),
            "{message}"
        );
        server.shutdown().await;
        return;
    }
    next_event(
        &mut events,
        "the initial object",
        |e| matches!(e, Event::InitApply(o) if o.name_any() == "existing"),
    )
    .await;
    next_event(&mut events, "the end of initial events", |e| {
        matches!(e, Event::InitDone)
    })
    .await;
    server.shutdown().await;
}

/// With a data directory, acknowledged writes survive a restart, the kubeconfig stays valid,
/// and watches resume from versions before the restart without a 410.
#[tokio::test]
async fn data_dir_survives_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };
    let server = TestServer::Sim(Server::start(config.clone()).await.expect("starts"));
    let kubeconfig = server.kubeconfig_yaml();
    let client = with_crds(&server).await;
    let api = bp_api(&client);
    let created = api
        .create(&PostParams::default(), &build_plane("durable", "p1"))
        .await
        .expect("created");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    next_event(&mut events, "the initial list", |e| {
        matches!(e, Event::InitDone)
    })
    .await;
    server.shutdown().await;

    // Port 0 again: the previous port is reused, so the same kubeconfig works.
    let restarted = Server::start(config).await.expect("restarts");
    assert_eq!(
        restarted.kubeconfig_yaml(),
        kubeconfig,
        "same port, CA and token"
    );
    let after = api.get("durable").await.expect("the object survived");
    assert_eq!(after.data["spec"]["planeID"], "p1");
    assert_eq!(after.metadata.uid, created.metadata.uid);
    api.patch(
        "durable",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"planeID": "p9"}})),
    )
    .await
    .expect("patched after restart");
    let seen = next_event(
        &mut events,
        "the update after the restart",
        |e| matches!(e, Event::Apply(o) | Event::InitApply(o) if o.data["spec"]["planeID"] == "p9"),
    )
    .await;
    assert!(
        matches!(seen, Event::Apply(_)),
        "resumed without a re-list: {seen:?}"
    );
    restarted.shutdown().await;
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

/// A kube-rs `Controller` reconciles every change: it writes `status.observedGeneration` for
/// each new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reconciles_on_changes() {
    let server = start().await;
    let client = with_crds(&server).await;
    let api = bp_api(&client);
    let reconcile = |object: Arc<DynamicObject>, api: Arc<Api<DynamicObject>>| async move {
        let generation = object.metadata.generation.unwrap_or(0);
        if object.data["status"]["observedGeneration"] != json!(generation) {
            api.patch_status(
                &object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"observedGeneration": generation}})),
            )
            .await?;
        }
        Ok::<_, ReconcileError>(Action::await_change())
    };
    let controller = Controller::new_with(api.clone(), watcher::Config::default(), build_planes())
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_millis(200)),
            Arc::new(api.clone()),
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    api.create(&PostParams::default(), &build_plane("ctl", "p1"))
        .await
        .expect("created");
    let observed = |generation: i64| {
        let api = api.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let object = api.get("ctl").await.expect("get");
                    if object.data["status"]["observedGeneration"] == json!(generation) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("generation {generation} was never reconciled"));
        }
    };
    observed(1).await;
    api.patch(
        "ctl",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"planeID": "p2"}})),
    )
    .await
    .expect("spec changed");
    observed(2).await;
    task.abort();
    server.shutdown().await;
}

/// A second namespace keeps objects apart; deleting a namespace removes what it held.
#[tokio::test]
async fn namespace_deletion_removes_contents() {
    let server = start().await;
    let client = with_crds(&server).await;
    create_namespace(&client, "other").await;
    let other: Api<DynamicObject> = Api::namespaced_with(client.clone(), "other", &build_planes());
    other
        .create(&PostParams::default(), &build_plane("bp", "p"))
        .await
        .expect("created");
    bp_api(&client)
        .create(&PostParams::default(), &build_plane("bp", "p"))
        .await
        .expect("same name elsewhere");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .delete("other", &DeleteParams::default())
        .await
        .expect("deleted");
    // kube-sim removes an emptied namespace at once; the real server's namespace controller
    // (in kube-controller-manager) does it a few seconds later (see the kube-sim README).
    tokio::time::timeout(Duration::from_secs(60), async {
        while namespaces.get_opt("other").await.expect("get").is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the namespace is removed once empty");
    assert!(other.get_opt("bp").await.expect("get").is_none());
    assert!(bp_api(&client).get_opt("bp").await.expect("get").is_some());
    server.shutdown().await;
}

/// An event a kube-rs `Recorder` publishes (events.k8s.io/v1) is a core v1 Event too, found by
/// the field selector `kubectl describe` uses; repeating it patches its series.
#[tokio::test]
async fn recorder_events_show_as_core_events() {
    use k8s_openapi::api::{core::v1::Event as CoreEvent, events::v1::Event as NewEvent};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = start().await;
    let client = with_crds(&server).await;
    let bp = bp_api(&client)
        .create(&PostParams::default(), &build_plane("ev", "p"))
        .await
        .expect("created");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "test-controller".into(),
            instance: None,
        },
    );
    let reference = kube::Resource::object_ref(&bp, &build_planes());
    let event = Event {
        type_: EventType::Warning,
        reason: "SecretNotFound".into(),
        note: Some("secret org/x not found".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &reference)
        .await
        .expect("published");
    recorder
        .publish(&event, &reference)
        .await
        .expect("published again (a patch)");
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "org");
    let selector = format!(
        "involvedObject.name=ev,involvedObject.namespace=org,involvedObject.kind=BuildPlane,involvedObject.uid={}",
        bp.metadata.uid.clone().expect("uid")
    );
    let found = core
        .list(&ListParams::default().fields(&selector))
        .await
        .expect("list")
        .items;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].reason.as_deref(), Some("SecretNotFound"));
    assert_eq!(found[0].message.as_deref(), Some("secret org/x not found"));
    assert_eq!(
        found[0].reporting_component.as_deref(),
        Some("test-controller")
    );
    let new: Api<NewEvent> = Api::namespaced(client, "org");
    let listed = new
        .list(&ListParams::default().fields("regarding.name=ev"))
        .await
        .expect("list")
        .items;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].series.as_ref().map(|s| s.count),
        Some(2),
        "the repeat patched the series"
    );
    server.shutdown().await;
}

/// `events.k8s.io/v1` and core `v1` Events are one storage: an event written through one API
/// reads through the other with the fields converted (`note`/`message`, `regarding`/
/// `involvedObject`, `deprecatedCount`/`count`, ...) and the Go structs' empty fields written
/// out; events.k8s.io validates strictly (creation needs `eventTime`, the reporting fields,
/// `action` and `reason`; most fields are immutable afterwards) while core validates only
/// events that carry an `eventTime`; managedFields keep the version of the write.
#[tokio::test]
async fn events_are_one_storage_in_two_versions() {
    use kube::api::{ApiResource, GroupVersionKind};
    let server = start().await;
    let client = server.client().await.expect("client");
    create_namespace(&client, "org").await;
    let new_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "org",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
            "events",
        ),
    );
    let core_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "org",
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Event"), "events"),
    );
    let event = |name: &str, data: serde_json::Value| {
        let mut object: DynamicObject = serde_json::from_value(data).expect("event");
        object.metadata.name = Some(name.into());
        object
    };
    let pp = PostParams {
        field_manager: Some("tester".into()),
        ..PostParams::default()
    };
    // events.k8s.io → core.
    new_api
        .create(
            &pp,
            &event(
                "new",
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {},
                "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "example.com/ctl",
                "reportingInstance": "ctl-0", "action": "Reconcile", "reason": "Started",
                "type": "Normal", "note": "hello",
                "regarding": {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "namespace": "org"},
                "related": {"apiVersion": "v1", "kind": "Secret", "name": "s", "namespace": "org"},
                "series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:05.000000Z"}}),
            ),
        )
        .await
        .expect("created through events.k8s.io");
    let core = core_api.get("new").await.expect("read through core");
    assert_eq!(core.data["message"], "hello");
    assert_eq!(core.data["involvedObject"]["name"], "c");
    assert_eq!(core.data["related"]["name"], "s");
    assert_eq!(core.data["reportingComponent"], "example.com/ctl");
    assert_eq!(core.data["reportingInstance"], "ctl-0");
    assert_eq!(core.data["action"], "Reconcile");
    assert_eq!(core.data["series"]["count"], 2);
    assert_eq!(core.data["eventTime"], "2026-01-01T00:00:00.000000Z");
    // The core struct's fields without omitempty.
    assert_eq!(core.data["source"], json!({}));
    assert_eq!(core.data.get("firstTimestamp"), Some(&json!(null)));
    assert_eq!(core.data.get("lastTimestamp"), Some(&json!(null)));
    assert!(core.data.get("count").is_none(), "{:?}", core.data);
    let fields = core.metadata.managed_fields.clone().unwrap_or_default();
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert_eq!(fields[0].api_version.as_deref(), Some("events.k8s.io/v1"));
    let owned = fields[0]
        .fields_v1
        .as_ref()
        .map(|f| f.0.clone())
        .unwrap_or_default();
    assert!(owned.get("f:note").is_some(), "{owned}");
    assert_eq!(
        owned["f:regarding"],
        json!({}),
        "an atomic reference: {owned}"
    );
    // core → events.k8s.io.
    core_api
        .create(
            &pp,
            &event(
                "old",
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {},
                "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "namespace": "org", "fieldPath": "data"},
                "reason": "Pulled", "message": "pulled it", "type": "Normal", "count": 3,
                "source": {"component": "kubelet", "host": "node-1"},
                "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:01:00Z"}),
            ),
        )
        .await
        .expect("created through core");
    let new = new_api
        .get("old")
        .await
        .expect("read through events.k8s.io");
    assert_eq!(new.data["note"], "pulled it");
    assert_eq!(new.data["regarding"]["fieldPath"], "data");
    assert_eq!(new.data["deprecatedCount"], 3);
    assert_eq!(new.data["deprecatedSource"]["host"], "node-1");
    assert_eq!(new.data["deprecatedFirstTimestamp"], "2026-01-01T00:00:00Z");
    assert_eq!(new.data["deprecatedLastTimestamp"], "2026-01-01T00:01:00Z");
    assert_eq!(new.data.get("eventTime"), Some(&json!(null)));
    for absent in [
        "reportingController",
        "reportingInstance",
        "message",
        "count",
    ] {
        assert!(new.data.get(absent).is_none(), "{absent}: {:?}", new.data);
    }
    let listed = new_api
        .list(&ListParams::default().fields("regarding.name=c"))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 2);
    // events.k8s.io validates creation strictly, with the internal field names.
    let err = new_api
        .create(
            &pp,
            &event(
                "bad",
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {},
                "type": "Odd", "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "a b",
                "series": {"count": 1}, "deprecatedCount": 2}),
            ),
        )
        .await
        .expect_err("invalid");
    let (code, reason, message) = api_error(&err);
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
    assert_eq!(
        message,
        "Event \"bad\" is invalid: [involvedObject.namespace: Invalid value: \"\": does not match event.namespace, reportingController: Invalid value: \"a b\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]'), reportingInstance: Required value, action: Required value, reason: Required value, series.count: Invalid value: \"\": should be at least 2, series.lastObservedTime: Required value, type: Invalid value: \"\": has invalid value: Odd, count: Invalid value: \"\": needs to be unset]"
    );
    let err = new_api
        .create(
            &pp,
            &event(
                "bad",
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {}}),
            ),
        )
        .await
        .expect_err("invalid");
    assert_eq!(
        api_error(&err).2,
        "Event \"bad\" is invalid: [involvedObject.namespace: Invalid value: \"\": does not match event.namespace, eventTime: Required value, type: Invalid value: \"\": has invalid value: ]"
    );
    // Core validates an event with an eventTime (naming reportingComponent), not one without.
    let err = core_api
        .create(
            &pp,
            &event(
                "bad",
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {},
                "eventTime": "2026-01-01T00:00:00.000000Z", "reason": "R", "action": "A",
                "reportingInstance": "i"}),
            ),
        )
        .await
        .expect_err("invalid");
    assert_eq!(
        api_error(&err).2,
        "Event \"bad\" is invalid: [involvedObject.namespace: Invalid value: \"\": does not match event.namespace, reportingComponent: Required value, reportingComponent: Invalid value: \"\": name part must be non-empty, reportingComponent: Invalid value: \"\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')]"
    );
    let err = core_api
        .create(
            &pp,
            &event(
                "bad",
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {},
                "involvedObject": {"kind": "ConfigMap", "name": "c", "namespace": "other"}}),
            ),
        )
        .await
        .expect_err("invalid");
    assert_eq!(
        api_error(&err).2,
        "Event \"bad\" is invalid: involvedObject.namespace: Invalid value: \"other\": does not match event.namespace"
    );
    core_api
        .create(
            &pp,
            &event(
                "loose",
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {},
                "involvedObject": {"kind": "ConfigMap", "name": "c", "namespace": "org"}}),
            ),
        )
        .await
        .expect("core accepts an event without eventTime loosely");
    // Through events.k8s.io, an event's content is immutable; its series may change.
    let err = new_api
        .patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"note": "changed", "action": "X"})),
        )
        .await
        .expect_err("immutable");
    assert_eq!(
        api_error(&err).2,
        "Event \"old\" is invalid: [message: Invalid value: \"changed\": field is immutable, action: Invalid value: \"X\": field is immutable]"
    );
    let patched = new_api
        .patch(
            "new",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"series": {"count": 3, "lastObservedTime": "2026-01-01T00:00:09.000000Z"}}),
            ),
        )
        .await
        .expect("the series changes");
    assert_eq!(patched.data["series"]["count"], 3);
    // Through core anything may change; the entries of the other version are dropped.
    let patched = core_api
        .patch(
            "new",
            &PatchParams::default(),
            &Patch::Merge(json!({"message": "changed through core", "count": 7})),
        )
        .await
        .expect("core changes anything");
    assert_eq!(patched.data["message"], "changed through core");
    let fields = patched.metadata.managed_fields.clone().unwrap_or_default();
    let versions: Vec<_> = fields.iter().map(|f| f.api_version.clone()).collect();
    assert_eq!(versions, vec![Some("v1".to_string())], "{fields:?}");
    let new = new_api.get("new").await.expect("get");
    assert_eq!(new.data["note"], "changed through core");
    assert_eq!(new.data["deprecatedCount"], 7);
    // Errors name the resource asked for.
    let err = new_api.get("nope").await.expect_err("absent");
    assert_eq!(
        api_error(&err),
        (
            404,
            "NotFound".to_string(),
            "events.events.k8s.io \"nope\" not found".to_string()
        )
    );
    server.shutdown().await;
}

/// `apiregistration.k8s.io/v1` APIServices: one per served group-version (none for
/// apiregistration itself), `Local` and `Available`, with the aggregator's priorities and label
/// (`onstart` for built-ins, `true` and 1000/100 for a CRD's versions, removed with the CRD);
/// `/apis` lists the groups in the order of those priorities.
#[tokio::test]
async fn api_services_list_every_served_group_version() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, GroupVersionKind};
    let server = start().await;
    let client = with_crds(&server).await;
    let registration = client
        .list_api_group_resources("apiregistration.k8s.io/v1")
        .await
        .expect("discovered");
    let names: Vec<(&str, Vec<String>)> = registration
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.verbs.clone()))
        .collect();
    assert_eq!(
        names,
        [
            (
                "apiservices",
                [
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch"
                ]
                .map(String::from)
                .to_vec()
            ),
            (
                "apiservices/status",
                ["get", "patch", "update"].map(String::from).to_vec()
            )
        ]
    );
    assert_eq!(
        registration.resources[0]
            .categories
            .clone()
            .unwrap_or_default(),
        ["api-extensions"]
    );
    let groups = client.list_api_groups().await.expect("groups");
    let mut served: Vec<String> = vec!["v1.".to_owned()];
    for group in &groups.groups {
        for version in &group.versions {
            if group.name != "apiregistration.k8s.io" {
                served.push(format!("{}.{}", version.version, group.name));
            }
        }
    }
    served.sort();
    let api = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    );
    let services: Api<DynamicObject> = Api::all_with(client.clone(), &api);
    let listed = services.list(&ListParams::default()).await.expect("list");
    let mut names: Vec<String> = listed.items.iter().map(|s| s.name_any()).collect();
    names.sort();
    assert_eq!(names, served, "one APIService per served group-version");
    for item in &listed.items {
        let conditions = &item.data["status"]["conditions"];
        assert_eq!(
            (
                &conditions[0]["type"],
                &conditions[0]["status"],
                &conditions[0]["reason"],
                &conditions[0]["message"]
            ),
            (
                &json!("Available"),
                &json!("True"),
                &json!("Local"),
                &json!("Local APIServices are always available")
            ),
            "{}",
            item.name_any()
        );
        assert!(item.data["spec"].get("service").is_none());
    }
    for (name, spec, label) in [
        (
            "v1.",
            json!({"groupPriorityMinimum": 18000, "version": "v1", "versionPriority": 1}),
            "onstart",
        ),
        (
            "v1.apps",
            json!({"group": "apps", "groupPriorityMinimum": 17800, "version": "v1", "versionPriority": 15}),
            "onstart",
        ),
        (
            "v1.events.k8s.io",
            json!({"group": "events.k8s.io", "groupPriorityMinimum": 17750, "version": "v1", "versionPriority": 15}),
            "onstart",
        ),
        (
            "v1alpha1.openchoreo.dev",
            json!({"group": "openchoreo.dev", "groupPriorityMinimum": 1000, "version": "v1alpha1", "versionPriority": 100}),
            "true",
        ),
    ] {
        let service = services.get(name).await.expect(name);
        assert_eq!(service.data["spec"], spec, "{name}");
        assert_eq!(
            service
                .labels()
                .get("kube-aggregator.kubernetes.io/automanaged"),
            Some(&label.to_owned()),
            "{name}"
        );
    }
    // The groups both servers serve, in the real server's order.
    let order = [
        "apiregistration.k8s.io",
        "apps",
        "events.k8s.io",
        "authentication.k8s.io",
        "authorization.k8s.io",
        "batch",
        "certificates.k8s.io",
        "rbac.authorization.k8s.io",
        "apiextensions.k8s.io",
        "scheduling.k8s.io",
        "coordination.k8s.io",
        "discovery.k8s.io",
        "openchoreo.dev",
    ];
    let listed_order: Vec<&str> = groups
        .groups
        .iter()
        .map(|g| g.name.as_str())
        .filter(|g| order.contains(g))
        .collect();
    assert_eq!(listed_order, order);
    // A CRD's APIService goes with the last CRD of its group.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in common::crds() {
        crds.delete(
            crd.metadata.name.as_deref().unwrap_or_default(),
            &DeleteParams::default(),
        )
        .await
        .expect("deleted");
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while services
            .get_opt("v1alpha1.openchoreo.dev")
            .await
            .expect("get")
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the APIService goes with the CRDs");
    server.shutdown().await;
}

/// `pods/ephemeralcontainers` (what `kubectl debug` patches): discovered with get, patch and
/// update; a write there changes `spec.ephemeralContainers` only (with the container defaults;
/// a new pod generation), existing ephemeral containers may be neither removed nor changed, and
/// new ones are validated with the real server's messages. Pods get the spec defaults and the
/// `Pending` status on creation, and cannot be created with ephemeral containers.
#[tokio::test]
async fn pods_take_ephemeral_containers_through_their_subresource() {
    use k8s_openapi::api::core::v1::Pod;
    let server = start().await;
    let client = server.client().await.expect("client");
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("discovered");
    let entry = core
        .resources
        .iter()
        .find(|r| r.name == "pods/ephemeralcontainers")
        .expect("pods/ephemeralcontainers listed");
    assert_eq!(
        (entry.kind.as_str(), entry.verbs.clone()),
        ("Pod", ["get", "patch", "update"].map(String::from).to_vec())
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}}))
    .expect("a pod");
    // The real server's ServiceAccount admission needs the namespace's `default` account,
    // which its controller creates a moment after start.
    let created = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match pods.create(&PostParams::default(), &pod).await {
                Ok(created) => return created,
                Err(err) if api_error(&err).0 == 403 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("create: {err}"),
            }
        }
    })
    .await
    .expect("the pod is created");
    let with_ephemeral: Pod = serde_json::from_value(json!({"metadata": {"name": "early"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}],
            "ephemeralContainers": [{"name": "e", "image": "busybox"}]}}))
    .expect("a pod");
    let err = pods
        .create(&PostParams::default(), &with_ephemeral)
        .await
        .expect_err("no ephemeral containers on create");
    assert_eq!(
        api_error(&err).2,
        "Pod \"early\" is invalid: spec.ephemeralContainers: Forbidden: cannot be set on create"
    );
    let spec = created.spec.clone().expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(spec.enable_service_links, Some(true));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert!(spec.security_context.is_some());
    assert_eq!(
        spec.containers[0].termination_message_policy.as_deref(),
        Some("File")
    );
    assert_eq!(
        spec.containers[0].image_pull_policy.as_deref(),
        Some("IfNotPresent")
    );
    let status = created.status.clone().expect("status");
    assert_eq!(
        (status.phase.as_deref(), status.qos_class.as_deref()),
        (Some("Pending"), Some("BestEffort"))
    );
    let generation = created.metadata.generation.expect("generation");

    let pp = PatchParams::default();
    // Only the ephemeral containers change, with the container defaults.
    let patched = pods
        .patch_subresource(
            "ephemeralcontainers",
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"ignored": "yes"}},
                "spec": {"containers": [{"name": "c", "image": "changed"}],
                    "ephemeralContainers": [{"name": "debugger", "image": "busybox:1.36",
                        "targetContainerName": "c"}]}})),
        )
        .await
        .expect("an ephemeral container is added");
    assert!(patched.metadata.labels.is_none(), "{:?}", patched.metadata);
    let spec = patched.spec.clone().expect("spec");
    assert_eq!(spec.containers[0].image.as_deref(), Some("nginx:1.27"));
    let ephemeral =
        serde_json::to_value(spec.ephemeral_containers.clone().unwrap_or_default()).expect("JSON");
    assert_eq!(
        ephemeral,
        json!([{"name": "debugger", "image": "busybox:1.36", "targetContainerName": "c",
            "imagePullPolicy": "IfNotPresent", "resources": {},
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}])
    );
    assert_eq!(patched.metadata.generation, Some(generation + 1));
    let read = pods
        .get_subresource("ephemeralcontainers", "p")
        .await
        .expect("read through the subresource");
    assert_eq!(
        read.metadata.resource_version,
        patched.metadata.resource_version
    );
    // A strategic patch without an order puts the new container first.
    let patched = pods
        .patch_subresource(
            "ephemeralcontainers",
            "p",
            &pp,
            &Patch::Strategic(
                json!({"spec": {"ephemeralContainers": [{"name": "second", "image": "busybox"}]}}),
            ),
        )
        .await
        .expect("a second one");
    let names: Vec<String> = patched
        .spec
        .and_then(|s| s.ephemeral_containers)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["second", "debugger"]);

    for (patch, message) in [
        (
            json!({"spec": {"ephemeralContainers": [{"name": "c", "image": "busybox"}]}}),
            "Pod \"p\" is invalid: spec.ephemeralContainers[0].name: Duplicate value: \"c\"",
        ),
        (
            json!({"spec": {"ephemeralContainers": [{"name": "noimage"}]}}),
            "Pod \"p\" is invalid: spec.ephemeralContainers[0].image: Required value",
        ),
        (
            json!({"spec": {"ephemeralContainers": [{"name": "e3", "image": "busybox",
                "ports": [{"containerPort": 80}], "targetContainerName": "nope",
                "readinessProbe": {"exec": {"command": ["x"]}},
                "resources": {"limits": {"cpu": "1"}}}]}}),
            "Pod \"p\" is invalid: [spec.ephemeralContainers[0].targetContainerName: Not found: \"nope\", spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container, spec.ephemeralContainers[0].resources: Forbidden: cannot be set for an Ephemeral Container, spec.ephemeralContainers[0].readinessProbe: Forbidden: cannot be set for an Ephemeral Container]",
        ),
        (
            json!({"spec": {"ephemeralContainers": [{"name": "Bad_Name", "image": "busybox"}]}}),
            "Pod \"p\" is invalid: spec.ephemeralContainers[0].name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        ),
    ] {
        let err = pods
            .patch_subresource("ephemeralcontainers", "p", &pp, &Patch::Strategic(patch))
            .await
            .expect_err(message);
        assert_eq!(api_error(&err).2, message);
    }
    let err = pods
        .patch_subresource(
            "ephemeralcontainers",
            "p",
            &pp,
            &Patch::Json::<()>(
                serde_json::from_value(
                    json!([{"op": "remove", "path": "/spec/ephemeralContainers/1"}]),
                )
                .expect("a JSON patch"),
            ),
        )
        .await
        .expect_err("not removed");
    assert_eq!(
        api_error(&err).2,
        "Pod \"p\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"debugger\" may not be removed\n"
    );
    let err = pods
        .patch_subresource(
            "ephemeralcontainers",
            "p",
            &pp,
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "replace", "path": "/spec/ephemeralContainers/1/image", "value": "alpine"}]))
                    .expect("a JSON patch"),
            ),
        )
        .await
        .expect_err("not changed");
    // The real server goes on with a diff of the Go structs.
    assert!(
        api_error(&err).2.starts_with(
            "Pod \"p\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"debugger\" may not be changed"
        ),
        "{err}"
    );
    // PUT replaces the list through the subresource too.
    let mut current = pods.get("p").await.expect("get");
    if let Some(spec) = current.spec.as_mut() {
        let mut list = spec.ephemeral_containers.clone().unwrap_or_default();
        list.push(
            serde_json::from_value(json!({"name": "third", "image": "busybox"})).expect("one"),
        );
        spec.ephemeral_containers = Some(list);
    }
    let replaced = pods
        .replace_subresource("ephemeralcontainers", "p", &PostParams::default(), &current)
        .await
        .expect("replaced");
    assert_eq!(
        replaced
            .spec
            .and_then(|s| s.ephemeral_containers)
            .map(|l| l.len()),
        Some(3)
    );
    server.shutdown().await;
}

/// Server-side apply of a CustomResourceDefinition itself: created with the applier's field
/// set (lists of versions atomic) and the `kube-apiserver` status entry, re-applied without a
/// new resourceVersion, changed with a new generation and accepted names, a conflict with
/// another applier worded as the real server words it (appliers by name, leaves before nested
/// fields), and `force` moving the field.
#[tokio::test]
async fn custom_resource_definitions_are_server_side_applied() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let server = start().await;
    let client = server.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = |short: &[&str], minimum: i64| {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": short},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": minimum}}}}}}}]}})
    };
    let apply = |manager: &str, force: bool| {
        let mut params = PatchParams::apply(manager);
        params.force = force;
        params
    };
    let established = || {
        let crds = crds.clone();
        async move {
            let condition = kube::runtime::wait::await_condition(
                crds,
                "widgets.example.com",
                kube::runtime::wait::conditions::is_crd_established(),
            );
            tokio::time::timeout(Duration::from_secs(30), condition)
                .await
                .expect("established in time")
                .expect("watch")
                .expect("the CRD")
        }
    };
    let applied = crds
        .patch(
            "widgets.example.com",
            &apply("tester", false),
            &Patch::Apply(crd(&["wd"], 1)),
        )
        .await
        .expect("applied");
    assert_eq!(applied.metadata.generation, Some(1));
    assert_eq!(
        serde_json::to_value(&applied.spec.conversion).expect("JSON"),
        json!({"strategy": "None"})
    );
    let current = established().await;
    let fields = current.metadata.managed_fields.clone().unwrap_or_default();
    let entries: Vec<(String, String, Option<String>, serde_json::Value)> = fields
        .iter()
        .map(|f| {
            (
                f.manager.clone().unwrap_or_default(),
                f.operation.clone().unwrap_or_default(),
                f.subresource.clone(),
                f.fields_v1
                    .as_ref()
                    .map(|v| v.0.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let condition = json!({".": {}, "f:lastTransitionTime": {}, "f:message": {}, "f:reason": {}, "f:status": {}, "f:type": {}});
    assert_eq!(
        entries,
        vec![
            (
                "tester".to_owned(),
                "Apply".to_owned(),
                None,
                json!({"f:spec": {"f:group": {}, "f:names": {"f:kind": {}, "f:plural": {}, "f:shortNames": {}, "f:singular": {}}, "f:scope": {}, "f:versions": {}}})
            ),
            (
                "kube-apiserver".to_owned(),
                "Update".to_owned(),
                Some("status".to_owned()),
                json!({"f:status": {"f:acceptedNames": {"f:kind": {}, "f:listKind": {}, "f:plural": {}, "f:shortNames": {}, "f:singular": {}},
                    "f:conditions": {"k:{\"type\":\"Established\"}": condition, "k:{\"type\":\"NamesAccepted\"}": condition}}})
            ),
        ]
    );
    // The same configuration again changes nothing.
    let again = crds
        .patch(
            "widgets.example.com",
            &apply("tester", false),
            &Patch::Apply(crd(&["wd"], 1)),
        )
        .await
        .expect("re-applied");
    assert_eq!(
        again.metadata.resource_version,
        current.metadata.resource_version
    );
    assert_eq!(again.metadata.generation, Some(1));
    // A change is a new generation, and the names are accepted.
    let changed = crds
        .patch(
            "widgets.example.com",
            &apply("tester", false),
            &Patch::Apply(crd(&["wd", "wdg"], 2)),
        )
        .await
        .expect("changed");
    assert_eq!(changed.metadata.generation, Some(2));
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let crd = crds.get("widgets.example.com").await.expect("get");
            let accepted = crd
                .status
                .and_then(|s| s.accepted_names)
                .and_then(|n| n.short_names)
                .unwrap_or_default();
            if accepted == ["wd", "wdg"] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the new short names are accepted");
    // Another applier conflicts on the fields it would change.
    let err = crds
        .patch(
            "widgets.example.com",
            &apply("other", false),
            &Patch::Apply(crd(&["other"], 3)),
        )
        .await
        .expect_err("a conflict");
    assert_eq!(
        api_error(&err),
        (
            409,
            "Conflict".to_owned(),
            "Apply failed with 2 conflicts: conflicts with \"tester\":\n- .spec.versions\n- .spec.names.shortNames".to_owned()
        )
    );
    let forced = crds
        .patch(
            "widgets.example.com",
            &apply("other", true),
            &Patch::Apply(crd(&["other"], 3)),
        )
        .await
        .expect("forced");
    assert_eq!(
        forced.spec.names.short_names.clone().unwrap_or_default(),
        ["other"]
    );
    let owners: Vec<(String, bool)> = forced
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .iter()
        .filter(|f| f.operation.as_deref() == Some("Apply"))
        .map(|f| {
            let fields = f
                .fields_v1
                .as_ref()
                .map(|v| v.0.clone())
                .unwrap_or_default();
            (
                f.manager.clone().unwrap_or_default(),
                fields["f:spec"]["f:names"].get("f:shortNames").is_some(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        [("other".to_owned(), true), ("tester".to_owned(), false)]
    );
    server.shutdown().await;
}

/// ComponentStatus (deprecated, still served): get and list only, computed on request: the
/// controller manager and scheduler probed on 127.0.0.1:10257 and :10259 (nothing listens there
/// in either test cluster, so both are unhealthy with the dial error) and the storage healthy;
/// an unknown name is a 404 worded with the singular, a watch a 405.
#[tokio::test]
async fn component_statuses_report_the_control_plane() {
    use k8s_openapi::api::core::v1::ComponentStatus;
    let server = start().await;
    let client = server.client().await.expect("client");
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("discovered");
    let entry = core
        .resources
        .iter()
        .find(|r| r.name == "componentstatuses")
        .expect("componentstatuses listed");
    assert_eq!(
        (
            entry.kind.as_str(),
            entry.namespaced,
            entry.verbs.clone(),
            entry.short_names.clone().unwrap_or_default()
        ),
        (
            "ComponentStatus",
            false,
            vec!["get".to_owned(), "list".to_owned()],
            vec!["cs".to_owned()]
        )
    );
    let statuses: Api<ComponentStatus> = Api::all(client.clone());
    let listed = statuses.list(&ListParams::default()).await.expect("list");
    let mut seen: Vec<(String, String, String)> = listed
        .items
        .iter()
        .map(|s| {
            let condition = s.conditions.clone().unwrap_or_default().remove(0);
            (
                s.name_any(),
                condition.status,
                condition.message.unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    let refused = |port: u16| {
        format!(
            "Get \"https://127.0.0.1:{port}/healthz\": dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    };
    assert_eq!(
        seen,
        [
            (
                "controller-manager".to_owned(),
                "False".to_owned(),
                refused(10257)
            ),
            ("etcd-0".to_owned(), "True".to_owned(), "ok".to_owned()),
            ("scheduler".to_owned(), "False".to_owned(), refused(10259)),
        ]
    );
    let etcd = statuses.get("etcd-0").await.expect("get");
    assert_eq!(
        serde_json::to_value(etcd.conditions).expect("JSON"),
        json!([{"type": "Healthy", "status": "True", "message": "ok"}])
    );
    let err = statuses.get("nope").await.expect_err("absent");
    assert_eq!(
        api_error(&err),
        (
            404,
            "NotFound".to_owned(),
            "componentstatus \"nope\" not found".to_owned()
        )
    );
    let err = statuses
        .watch(&kube::api::WatchParams::default(), "0")
        .await
        .map(|_| ())
        .expect_err("no watch");
    assert_eq!(
        api_error(&err),
        (
            405,
            "MethodNotAllowed".to_owned(),
            "watch is not supported on resources of kind \"componentstatuses\"".to_owned()
        )
    );
    server.shutdown().await;
}

/// A new cluster holds what kube-apiserver creates at start: the four namespaces, the
/// `default/kubernetes` Service, `cluster-admin` bound to `system:masters`, the two system
/// PriorityClasses.
#[tokio::test]
async fn a_new_cluster_has_the_bootstrap_objects() {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use k8s_openapi::api::scheduling::v1::PriorityClass;
    let server = start().await;
    let client = server.client().await.expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // The real server creates them just after it is ready.
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        tokio::time::timeout(Duration::from_secs(30), async {
            while namespaces.get_opt(name).await.expect("get").is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("namespace {name}"));
    }
    // The real server's bootstrap controller creates it after readiness too (seen missing on a
    // busy machine right after `/readyz` said ok).
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let kubernetes = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(service) = services.get_opt("kubernetes").await.expect("get") {
                return service;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("default/kubernetes within 30 s");
    let labels = kubernetes.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("component").map(String::as_str),
        Some("apiserver")
    );
    let spec = kubernetes.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("https"), 443));

    let role = Api::<ClusterRole>::all(client.clone())
        .get("cluster-admin")
        .await
        .expect("cluster-admin");
    let rules = role.rules.expect("rules");
    assert!(rules.iter().any(
        |rule| rule.verbs == ["*"] && rule.resources.as_deref() == Some(&["*".to_string()][..])
    ));
    let binding = Api::<ClusterRoleBinding>::all(client.clone())
        .get("cluster-admin")
        .await
        .expect("cluster-admin binding");
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("Group", "system:masters")
    );

    let classes: Api<PriorityClass> = Api::all(client);
    let critical = classes
        .get("system-node-critical")
        .await
        .expect("system-node-critical");
    assert_eq!(critical.value, 2_000_001_000);
    assert_eq!(
        classes
            .get("system-cluster-critical")
            .await
            .expect("class")
            .value,
        2_000_000_000
    );
    server.shutdown().await;
}

/// Metadata-only responses (`Accept: ...;as=PartialObjectMetadata`): get, list and a metadata
/// watcher see names, labels and versions, never a Secret's data.
#[tokio::test]
async fn metadata_only_responses_carry_no_data() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::PartialObjectMeta;
    let server = start().await;
    let client = server.client().await.expect("client");
    create_namespace(&client, "org").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "org");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s", "labels": {"app": "x"}},
        "stringData": {"token": "hidden"},
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("created");

    let meta = secrets.get_metadata("s").await.expect("metadata");
    assert_eq!(meta.metadata.name.as_deref(), Some("s"));
    let types = meta.types.expect("types");
    assert_eq!(
        (types.api_version.as_str(), types.kind.as_str()),
        ("meta.k8s.io/v1", "PartialObjectMetadata")
    );
    let listed = secrets
        .list_metadata(&Default::default())
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.types.kind, "PartialObjectMetadataList");

    // The raw answers hold no data.
    for (path, accept) in [
        (
            "/api/v1/namespaces/org/secrets/s",
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        ),
        (
            "/api/v1/namespaces/org/secrets",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        ),
    ] {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .expect("request");
        let text = client.request_text(request).await.expect("answer");
        assert!(
            !text.contains("aGlkZGVu") && !text.contains("\"data\""),
            "{text}"
        );
    }

    let metadata: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), "org");
    let mut events = watcher(metadata, watcher::Config::default()).boxed();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await {
                Some(Ok(Event::InitApply(object))) => break object,
                Some(Ok(_)) => continue,
                other => panic!("metadata watcher: {other:?}"),
            }
        }
    })
    .await
    .expect("the initial object");
    assert_eq!(seen.metadata.name.as_deref(), Some("s"));
    server.shutdown().await;
}

/// `batch/v1` Jobs: discovered with their status subresource, stored with the defaults the API
/// server sets (counts, modes, the generated selector and labels, the pod template's defaults),
/// refused without a restart policy a Job allows, listed by label, deleted. The job controller
/// of the real cluster's kube-controller-manager writes status and pods; the test reads neither.
#[tokio::test]
async fn jobs_are_stored_with_the_servers_defaults() {
    use k8s_openapi::api::batch::v1::Job;
    let server = start().await;
    let client = server.client().await.expect("client");
    create_namespace(&client, "org").await;
    let resources = client
        .list_api_group_resources("batch/v1")
        .await
        .expect("batch/v1 discovered");
    let jobs_entry = resources
        .resources
        .iter()
        .find(|r| r.name == "jobs")
        .expect("jobs listed");
    assert_eq!(jobs_entry.kind, "Job");
    assert!(jobs_entry.namespaced);
    assert_eq!(
        jobs_entry.categories.as_deref(),
        Some(&["all".to_owned()][..])
    );
    assert!(resources.resources.iter().any(|r| r.name == "jobs/status"));

    let jobs: Api<Job> = Api::namespaced(client.clone(), "org");
    let job = |name: &str, spec: serde_json::Value| -> Job {
        serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name}, "spec": spec}))
        .expect("a Job")
    };
    let err = jobs
        .create(
            &PostParams::default(),
            &job(
                "bad",
                json!({"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}),
            ),
        )
        .await
        .expect_err("a Job's pods must not restart always");
    assert_eq!(
        api_error(&err),
        (
            422,
            "Invalid".to_owned(),
            "Job.batch \"bad\" is invalid: spec.template.spec.restartPolicy: Required value: valid values: \"OnFailure\", \"Never\"".to_owned()
        )
    );

    let created = jobs
        .create(
            &PostParams::default(),
            &job("plain", json!({"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}, {"name": "d", "image": "busybox:1.36"}]}}})),
        )
        .await
        .expect("created");
    let uid = created.metadata.uid.clone().expect("uid");
    let value = serde_json::to_value(&created).expect("json");
    let spec = &value["spec"];
    for (field, expected) in [
        ("parallelism", json!(1)),
        ("completions", json!(1)),
        ("backoffLimit", json!(6)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
        ("manualSelector", json!(false)),
        (
            "selector",
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        ),
    ] {
        assert_eq!(spec[field], expected, "spec.{field}");
    }
    let labels = json!({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "plain",
        "controller-uid": uid, "job-name": "plain"});
    assert_eq!(spec["template"]["metadata"]["labels"], labels);
    assert_eq!(
        value["metadata"]["labels"], labels,
        "a Job without labels takes its pods'"
    );
    assert_eq!(created.metadata.generation, Some(1));
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["dnsPolicy"], "ClusterFirst");
    assert_eq!(pod["schedulerName"], "default-scheduler");
    assert_eq!(pod["securityContext"], json!({}));
    let container = &pod["containers"][0];
    assert_eq!(container["terminationMessagePath"], "/dev/termination-log");
    assert_eq!(container["terminationMessagePolicy"], "File");
    assert_eq!(container["resources"], json!({}));
    assert_eq!(container["imagePullPolicy"], "Always");
    assert_eq!(pod["containers"][1]["imagePullPolicy"], "IfNotPresent");

    let given = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "indexed", "labels": {"team": "a"}},
                "spec": {"suspend": true, "completions": 3, "parallelism": 2, "completionMode": "Indexed",
                    "backoffLimit": 1,
                    "template": {"metadata": {"labels": {"app": "x"}},
                        "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "busybox"}]}}}}))
            .expect("a Job"),
        )
        .await
        .expect("created");
    let value = serde_json::to_value(&given).expect("json");
    assert_eq!(
        value["metadata"]["labels"],
        json!({"team": "a"}),
        "given labels stay"
    );
    assert_eq!(value["spec"]["template"]["metadata"]["labels"]["app"], "x");
    assert_eq!(
        value["spec"]["template"]["metadata"]["labels"]["job-name"],
        "indexed"
    );
    for (field, expected) in [
        ("parallelism", json!(2)),
        ("completions", json!(3)),
        ("backoffLimit", json!(1)),
        ("completionMode", json!("Indexed")),
        ("suspend", json!(true)),
    ] {
        assert_eq!(value["spec"][field], expected, "spec.{field}");
    }

    let fetched = jobs.get("plain").await.expect("get");
    assert_eq!(fetched.spec, created.spec);

    // What a Job may not be, and what it may not change.
    let pod = |policy: &str, containers: serde_json::Value| json!({"spec": {"restartPolicy": policy, "containers": containers}});
    let busybox = json!([{"name": "c", "image": "busybox"}]);
    for (spec, message) in [
        (
            json!({"parallelism": -1, "template": pod("Never", busybox.clone())}),
            "spec.parallelism: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            json!({"template": pod("Never", json!([]))}),
            "spec.template.spec.containers: Required value",
        ),
        (
            json!({"template": pod("Always", busybox.clone())}),
            "spec.template.spec.restartPolicy: Required value: valid values: \"OnFailure\", \"Never\"",
        ),
    ] {
        let err = jobs
            .create(&PostParams::default(), &job("refused", spec))
            .await
            .expect_err(message);
        assert_eq!(
            api_error(&err).2,
            format!("Job.batch \"refused\" is invalid: {message}")
        );
    }
    let merge = |patch: serde_json::Value| Patch::Merge(patch);
    let pp = PatchParams::default();
    let scaled = jobs
        .patch("plain", &pp, &merge(json!({"spec": {"parallelism": 3}})))
        .await
        .expect("parallelism may change");
    assert_eq!(scaled.spec.as_ref().and_then(|s| s.parallelism), Some(3));
    assert_eq!(scaled.metadata.generation, Some(2));
    for (patch, message) in [
        (
            json!({"spec": {"completions": 2}}),
            "spec.completions: Invalid value: 2: field is immutable",
        ),
        (
            json!({"spec": {"completionMode": "Indexed"}}),
            "spec.completionMode: Invalid value: \"Indexed\": field is immutable",
        ),
    ] {
        let err = jobs
            .patch("plain", &pp, &merge(patch))
            .await
            .expect_err(message);
        assert_eq!(
            api_error(&err).2,
            format!("Job.batch \"plain\" is invalid: {message}")
        );
    }
    let err = jobs
        .patch(
            "plain",
            &pp,
            &merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}, {"name": "d", "image": "busybox:1.36"}]}}}})),
        )
        .await
        .expect_err("the pods of a running Job stay as they are");
    let (code, _, message) = api_error(&err);
    assert_eq!(code, 422);
    assert!(
        message.starts_with("Job.batch \"plain\" is invalid: spec.template")
            && message.ends_with("field is immutable"),
        "{message}"
    );
    let listed = jobs
        .list(&ListParams::default().labels("job-name=plain"))
        .await
        .expect("list");
    let names: Vec<String> = listed.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["plain"]);
    let all = jobs.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 2);

    // A background delete removes the Job at once; the default (orphan) one goes after the
    // real server's garbage collector removed its `orphan` finalizer.
    let deleted = jobs
        .delete("indexed", &DeleteParams::background())
        .await
        .expect("deleted");
    assert!(deleted.is_right(), "a background delete answers a Status");
    jobs.delete("plain", &DeleteParams::default())
        .await
        .expect("deleted");
    tokio::time::timeout(Duration::from_secs(30), async {
        while !jobs
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the Jobs are gone");
    server.shutdown().await;
}

/// A certificate request (PEM, as `spec.request` holds it before base64).
fn csr_pem(name: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .serialize_request(&key)
        .expect("request")
        .pem()
        .expect("pem")
}

/// `certificates.k8s.io/v1` CertificateSigningRequests: discovered with `approval` and `status`;
/// the request must be PEM and name a signer; the requester is recorded; the spec never
/// changes; approval conditions come through `approval` (timestamps filled in) and are never
/// removed, nor added through `status`, whose certificate must be PEM.
#[tokio::test]
async fn certificate_signing_requests_are_approved_through_approval() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest as Csr;
    let server = start().await;
    let client = server.client().await.expect("client");
    let resources = client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
        .expect("discovered");
    for name in [
        "certificatesigningrequests",
        "certificatesigningrequests/approval",
        "certificatesigningrequests/status",
    ] {
        let entry = resources
            .resources
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name} listed"));
        assert_eq!(entry.kind, "CertificateSigningRequest");
        assert!(!entry.namespaced);
    }
    let csrs: Api<Csr> = Api::all(client.clone());
    let csr = |name: &str, request: &str, signer: Option<&str>| -> Csr {
        use base64::Engine as _;
        let mut spec = json!({"request": base64::engine::general_purpose::STANDARD.encode(request),
            "usages": ["client auth"]});
        if let Some(signer) = signer {
            spec["signerName"] = json!(signer);
        }
        serde_json::from_value(json!({"apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest", "metadata": {"name": name}, "spec": spec}))
        .expect("a CSR")
    };
    let pp = PostParams::default();
    let err = csrs
        .create(&pp, &csr("bad", "hello", Some("example.com/signer")))
        .await
        .expect_err("not PEM");
    assert_eq!(
        api_error(&err),
        (422, "Invalid".to_owned(), "CertificateSigningRequest.certificates.k8s.io \"bad\" is invalid: spec.request: Invalid value: \"aGVsbG8=\": PEM block type must be CERTIFICATE REQUEST".to_owned())
    );
    let err = csrs
        .create(&pp, &csr("nosigner", &csr_pem("x"), None))
        .await
        .expect_err("no signer");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"nosigner\" is invalid: spec.signerName: Required value"
    );

    let valid = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(csr_pem("x"))
    };
    for (spec, message) in [
        (
            json!({"signerName": "example.com/signer"}),
            "spec.usages: Required value".to_owned(),
        ),
        (
            json!({"signerName": "nodomain", "usages": ["client auth"]}),
            "spec.signerName: Invalid value: \"nodomain\": must be a fully qualified domain and path of the form 'example.com/signer-name'".to_owned(),
        ),
        (
            json!({"signerName": "example.com/signer", "usages": ["client auth"], "expirationSeconds": 60}),
            "spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 600 seconds (10 minutes)".to_owned(),
        ),
        (
            json!({"signerName": "example.com/signer", "usages": ["frobnicate"]}),
            "spec.usages[0]: Unsupported value: \"frobnicate\": supported values: \"any\", \"cert sign\", \"client auth\", \"code signing\", \"content commitment\", \"crl sign\", \"data encipherment\", \"decipher only\", \"digital signature\", \"email protection\", \"encipher only\", \"ipsec end system\", \"ipsec tunnel\", \"ipsec user\", \"key agreement\", \"key encipherment\", \"microsoft sgc\", \"netscape sgc\", \"ocsp signing\", \"s/mime\", \"server auth\", \"signing\", \"timestamping\"".to_owned(),
        ),
    ] {
        let mut spec = spec;
        spec["request"] = json!(valid);
        let refused: Csr = serde_json::from_value(json!({"apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest", "metadata": {"name": "refused"}, "spec": spec}))
        .expect("a CSR");
        let err = csrs.create(&pp, &refused).await.expect_err(&message);
        assert_eq!(
            api_error(&err).2,
            format!("CertificateSigningRequest.certificates.k8s.io \"refused\" is invalid: {message}")
        );
    }

    let created = csrs
        .create(
            &pp,
            &csr("alice", &csr_pem("alice"), Some("example.com/signer")),
        )
        .await
        .expect("created");
    let groups = created.spec.groups.clone().unwrap_or_default();
    assert!(
        created
            .spec
            .username
            .as_deref()
            .is_some_and(|u| !u.is_empty())
            && groups.contains(&"system:masters".to_owned()),
        "the requester is recorded: {:?}",
        created.spec
    );
    assert!(
        created
            .status
            .as_ref()
            .is_none_or(|s| s.conditions.is_none())
    );
    assert_eq!(created.metadata.generation, None);
    csrs.create(
        &pp,
        &csr("bob", &csr_pem("bob"), Some("example.com/signer")),
    )
    .await
    .expect("created");

    // The spec is immutable: a change is ignored, not refused.
    let unchanged = csrs
        .patch(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"usages": ["server auth"]}})),
        )
        .await
        .expect("patched");
    assert_eq!(unchanged.spec.usages, Some(vec!["client auth".to_owned()]));
    assert_eq!(
        unchanged.metadata.resource_version,
        created.metadata.resource_version
    );

    let approval = |conditions: serde_json::Value| {
        let mut body = serde_json::to_value(&created).expect("json");
        body["status"] = json!({"conditions": conditions});
        body
    };
    let err = csrs
        .replace_subresource(
            "approval",
            "alice",
            &pp,
            &approval(
                json!([{"type": "Approved", "status": "False", "reason": "R", "message": "m"}]),
            ),
        )
        .await
        .expect_err("an approval is True");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"alice\" is invalid: status.conditions[0].status: Unsupported value: \"False\": supported values: \"True\""
    );
    let err = csrs
        .replace_subresource(
            "approval",
            "alice",
            &pp,
            &approval(json!([{"type": "Approved", "reason": "R", "message": "m"}])),
        )
        .await
        .expect_err("a status is required");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"alice\" is invalid: status.conditions[0].status: Required value"
    );
    let approved = csrs
        .replace_subresource(
            "approval",
            "alice",
            &pp,
            &approval(
                json!([{"type": "Approved", "status": "True", "reason": "Test", "message": "ok"}]),
            ),
        )
        .await
        .expect("approved");
    let conditions = approved
        .status
        .clone()
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    assert_eq!(conditions.len(), 1);
    assert_eq!(
        (conditions[0].type_.as_str(), conditions[0].status.as_str()),
        ("Approved", "True")
    );
    assert!(
        conditions[0].last_update_time.is_some() && conditions[0].last_transition_time.is_some()
    );
    let err = csrs
        .replace_subresource("approval", "alice", &pp, &approval(json!([])))
        .await
        .expect_err("a stale approval");
    assert_eq!(api_error(&err).1, "Conflict");

    let merge = |status: serde_json::Value| Patch::Merge(json!({"status": status}));
    let err = csrs
        .patch_status(
            "alice",
            &PatchParams::default(),
            &merge(json!({"conditions": []})),
        )
        .await
        .expect_err("approval conditions stay");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"alice\" is invalid: status.conditions: Forbidden: updates may not remove a condition of type \"Approved\""
    );
    let err = csrs
        .patch_status(
            "bob",
            &PatchParams::default(),
            &merge(json!({"conditions": [{"type": "Approved", "status": "True", "reason": "R", "message": "m"}]})),
        )
        .await
        .expect_err("approval goes through approval");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"bob\" is invalid: status.conditions: Forbidden: updates may not add a condition of type \"Approved\""
    );
    let err = csrs
        .patch_status(
            "alice",
            &PatchParams::default(),
            &merge(json!({"certificate": "aGVsbG8="})),
        )
        .await
        .expect_err("a certificate is PEM");
    assert_eq!(
        api_error(&err).2,
        "CertificateSigningRequest.certificates.k8s.io \"alice\" is invalid: status.certificate: Invalid value: \"<certificate data>\": must contain at least one CERTIFICATE PEM block"
    );
    let denied = csrs
        .patch_subresource(
            "approval",
            "bob",
            &PatchParams::default(),
            &merge(json!({"conditions": [{"type": "Denied", "status": "True", "reason": "R", "message": "no"}]})),
        )
        .await
        .expect("denied");
    assert_eq!(
        denied
            .status
            .and_then(|s| s.conditions)
            .map(|c| c[0].type_.clone()),
        Some("Denied".to_owned())
    );
    server.shutdown().await;
}

/// A client that presents only this bearer token to the server under test.
async fn client_with_token(server: &TestServer, token: &str) -> kube::Client {
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_owned().into()),
        ..Default::default()
    };
    kube::Client::try_from(config).expect("client")
}

/// A client with this kubeconfig's cluster and the given credentials (PEM certificate and key,
/// bearer token).
async fn client_with_credentials(
    server: &TestServer,
    identity: Option<(&str, &str)>,
    token: Option<&str>,
) -> kube::Client {
    use base64::Engine as _;
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    config.auth_info = kube::config::AuthInfo {
        token: token.map(|t| t.to_owned().into()),
        client_certificate_data: identity.map(|(cert, _)| b64(cert)),
        client_key_data: identity.map(|(_, key)| b64(key).into()),
        ..Default::default()
    };
    kube::Client::try_from(config).expect("client")
}

/// Who the server says the client is (SelfSubjectReview).
async fn whoami(
    client: &kube::Client,
) -> Result<k8s_openapi::api::authentication::v1::UserInfo, kube::Error> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let reviews: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = reviews
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1",
                "kind": "SelfSubjectReview"}))
            .expect("a review"),
        )
        .await?;
    Ok(review.status.and_then(|s| s.user_info).expect("user info"))
}

/// The admin kubeconfig with a client certificate (as kubeadm, kind and k3d write it)
/// authenticates as `kubernetes-admin` in `system:masters`, with the certificate's SHA-256 as
/// credential id, and is the requester of a CertificateSigningRequest; a certificate from
/// another CA authenticates nobody (401), though a valid token beside it does; a trusted
/// certificate wins over a token.
#[tokio::test]
async fn client_certificates_authenticate_the_admin() {
    use base64::Engine as _;
    use k8s_openapi::api::{
        authentication::v1::TokenRequest, certificates::v1::CertificateSigningRequest as Csr,
        core::v1::ServiceAccount,
    };
    let server = start().await;
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&server.cert_kubeconfig_yaml()).expect("kubeconfig");
    let user = kubeconfig.auth_infos[0].auth_info.clone().expect("a user");
    assert!(user.token.is_none(), "no token: {user:?}");
    let decode = |data: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64"),
        )
        .expect("PEM")
    };
    let cert_pem = decode(
        user.client_certificate_data
            .as_deref()
            .expect("a certificate"),
    );
    let key_pem = {
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&server.cert_kubeconfig_yaml()).expect("YAML");
        decode(
            yaml["users"][0]["user"]["client-key-data"]
                .as_str()
                .expect("a key"),
        )
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let admin = whoami(&client)
        .await
        .expect("the certificate authenticates");
    assert_eq!(admin.username.as_deref(), Some("kubernetes-admin"));
    assert_eq!(
        admin.groups.clone().unwrap_or_default(),
        ["system:masters", "system:authenticated"]
    );
    let der = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("DER")
    };
    let digest = {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .expect("TLS 1.3 suite");
        let hash = suite.common.hash_provider.hash(der.as_ref());
        hash.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(
        admin
            .extra
            .clone()
            .unwrap_or_default()
            .get("authentication.kubernetes.io/credential-id"),
        Some(&vec![format!("X509SHA256={digest}")])
    );
    // The requester of a CertificateSigningRequest.
    let csrs: Api<Csr> = Api::all(client.clone());
    let created = csrs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "certificates.k8s.io/v1",
                "kind": "CertificateSigningRequest", "metadata": {"name": "by-admin"},
                "spec": {"request": base64::engine::general_purpose::STANDARD.encode(csr_pem("x")),
                    "signerName": "example.com/signer", "usages": ["client auth"]}}))
            .expect("a CSR"),
        )
        .await
        .expect("created");
    assert_eq!(created.spec.username.as_deref(), Some("kubernetes-admin"));
    assert_eq!(
        created.spec.groups.clone().unwrap_or_default(),
        ["system:masters", "system:authenticated"]
    );
    assert_eq!(created.spec.extra, admin.extra);
    // A certificate from another CA.
    let (other_cert, other_key) = {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "intruder");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    let intruder = client_with_credentials(&server, Some((&other_cert, &other_key)), None).await;
    let err = whoami(&intruder)
        .await
        .expect_err("an untrusted certificate");
    assert_eq!(api_error(&err).0, 401);
    create_namespace(&client, "org").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "org");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "robot"}})).expect("account"),
        )
        .await
        .expect("created");
    let token = accounts
        .create_subresource::<_, TokenRequest>(
            "token",
            "robot",
            &PostParams::default(),
            &serde_json::from_value::<TokenRequest>(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}),
            )
            .expect("a request"),
        )
        .await
        .expect("a token")
        .status
        .expect("status")
        .token;
    let both =
        client_with_credentials(&server, Some((&other_cert, &other_key)), Some(&token)).await;
    assert_eq!(
        whoami(&both).await.expect("the token").username.as_deref(),
        Some("system:serviceaccount:org:robot")
    );
    let admin_and_token =
        client_with_credentials(&server, Some((&cert_pem, &key_pem)), Some(&token)).await;
    assert_eq!(
        whoami(&admin_and_token)
            .await
            .expect("the certificate")
            .username
            .as_deref(),
        Some("kubernetes-admin")
    );
    server.shutdown().await;
}

/// ServiceAccount tokens: `serviceaccounts/token` (TokenRequest) issues one for the lifetime
/// asked (default 1 h, at least 10 min) and the API server's audience; the server accepts it
/// as a bearer token (a SelfSubjectReview names the account), TokenReview answers for it, and
/// refuses unknown tokens and tokens for other audiences.
#[tokio::test]
async fn service_account_tokens_authenticate_and_are_reviewed() {
    use k8s_openapi::api::{
        authentication::v1::{SelfSubjectReview, TokenRequest, TokenReview},
        core::v1::ServiceAccount,
    };
    let server = start().await;
    let client = server.client().await.expect("client");
    create_namespace(&client, "org").await;
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("core discovered");
    let token_entry = core
        .resources
        .iter()
        .find(|r| r.name == "serviceaccounts/token")
        .expect("serviceaccounts/token listed");
    assert_eq!(
        (
            token_entry.kind.as_str(),
            token_entry.group.as_deref(),
            token_entry.version.as_deref(),
            token_entry.verbs.clone()
        ),
        (
            "TokenRequest",
            Some("authentication.k8s.io"),
            Some("v1"),
            vec!["create".to_owned()]
        )
    );
    let authn = client
        .list_api_group_resources("authentication.k8s.io/v1")
        .await
        .expect("authentication discovered");
    let reviews = authn
        .resources
        .iter()
        .find(|r| r.name == "tokenreviews")
        .expect("tokenreviews listed");
    assert_eq!(reviews.verbs, ["create"]);

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "org");
    let account = accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "robot"}})).expect("account"),
        )
        .await
        .expect("created");
    let uid = account.metadata.uid.clone().expect("uid");
    let request = |spec: serde_json::Value| -> TokenRequest {
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest", "spec": spec}))
        .expect("a TokenRequest")
    };
    let issue = |name: &'static str, spec: serde_json::Value| {
        let accounts = accounts.clone();
        let body = request(spec);
        async move {
            accounts
                .create_subresource::<_, TokenRequest>("token", name, &PostParams::default(), &body)
                .await
        }
    };
    let before = chrono::Utc::now();
    let issued = issue("robot", json!({})).await.expect("a token");
    assert_eq!(issued.metadata.name.as_deref(), Some("robot"));
    assert_eq!(issued.metadata.namespace.as_deref(), Some("org"));
    assert_eq!(issued.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(issued.spec.expiration_seconds, Some(3600));
    assert_eq!(
        issued.spec.audiences,
        ["https://kubernetes.default.svc.cluster.local"]
    );
    let status = issued.status.expect("status");
    let token = status.token;
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let lifetime = status.expiration_timestamp.0.as_second() - before.timestamp();
    assert!((3590..=3610).contains(&lifetime), "{lifetime}");

    let short = issue("robot", json!({"expirationSeconds": 60}))
        .await
        .expect_err("too short");
    assert_eq!(
        api_error(&short),
        (422, "Invalid".to_owned(), "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 10 minutes".to_owned())
    );
    let missing = issue("nobody", json!({})).await.expect_err("no account");
    assert_eq!(
        api_error(&missing),
        (
            404,
            "NotFound".to_owned(),
            "serviceaccounts \"nobody\" not found".to_owned()
        )
    );
    let other = issue(
        "robot",
        json!({"expirationSeconds": 600, "audiences": ["foo"]}),
    )
    .await
    .expect("a token for another audience");
    assert_eq!(other.spec.audiences, ["foo"]);
    let other_status = other.status.expect("status");
    let lifetime = other_status.expiration_timestamp.0.as_second() - before.timestamp();
    assert!((590..=610).contains(&lifetime), "{lifetime}");

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str, audiences: Option<Vec<&str>>| -> TokenReview {
        let mut spec = json!({"token": token});
        if let Some(audiences) = audiences {
            spec["audiences"] = json!(audiences);
        }
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview", "spec": spec}))
        .expect("a TokenReview")
    };
    let pp = PostParams::default();
    let answer = reviews
        .create(&pp, &review(&token, None))
        .await
        .expect("reviewed")
        .status
        .expect("status");
    assert_eq!(answer.authenticated, Some(true));
    let user = answer.user.expect("user");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:org:robot")
    );
    assert_eq!(user.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(
        user.groups.unwrap_or_default(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:org",
            "system:authenticated"
        ]
    );
    let credential = user.extra.unwrap_or_default();
    assert!(
        credential["authentication.kubernetes.io/credential-id"][0].starts_with("JTI="),
        "{credential:?}"
    );
    assert_eq!(
        answer.audiences.unwrap_or_default(),
        ["https://kubernetes.default.svc.cluster.local"]
    );

    let refused = reviews
        .create(&pp, &review("nope", None))
        .await
        .expect("reviewed")
        .status
        .expect("status");
    assert_ne!(refused.authenticated, Some(true));
    assert_eq!(refused.error.as_deref(), Some("invalid bearer token"));
    let wrong_audience = reviews
        .create(&pp, &review(&other_status.token, None))
        .await
        .expect("reviewed")
        .status
        .expect("status");
    assert_ne!(wrong_audience.authenticated, Some(true));
    assert_eq!(
        wrong_audience.error.as_deref(),
        Some(
            "[invalid bearer token, token audiences [\"foo\"] is invalid for the target audiences [\"https://kubernetes.default.svc.cluster.local\"]]"
        )
    );
    let own_audience = reviews
        .create(&pp, &review(&other_status.token, Some(vec!["foo", "bar"])))
        .await
        .expect("reviewed")
        .status
        .expect("status");
    assert_eq!(own_audience.authenticated, Some(true));
    assert_eq!(own_audience.audiences.unwrap_or_default(), ["foo"]);
    let empty = reviews
        .create(&pp, &review("", None))
        .await
        .expect_err("a token is required");
    assert_eq!(
        api_error(&empty),
        (
            400,
            "BadRequest".to_owned(),
            "token is required for TokenReview in authentication".to_owned()
        )
    );

    // kube-sim's own (configured) token reviews as its admin; the real cluster's admin presents
    // a client certificate, not a token.
    if let TestServer::Sim(sim) = &server {
        let admin = reviews
            .create(&pp, &review(sim.token(), None))
            .await
            .expect("reviewed")
            .status
            .expect("status");
        assert_eq!(admin.authenticated, Some(true));
        let user = admin.user.expect("user");
        assert_eq!(user.username.as_deref(), Some("kube-sim:admin"));
        assert!(
            user.groups
                .unwrap_or_default()
                .contains(&"system:masters".to_owned())
        );
    }

    // The token is a bearer token of the server; the other audience's is not.
    let as_robot = client_with_token(&server, &token).await;
    let reviews_as_robot: Api<SelfSubjectReview> = Api::all(as_robot);
    let me = reviews_as_robot
        .create(
            &pp,
            &serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1",
                "kind": "SelfSubjectReview"}))
            .expect("a review"),
        )
        .await
        .expect("the token authenticates");
    let info = me.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(
        info.username.as_deref(),
        Some("system:serviceaccount:org:robot")
    );
    for bad in [other_status.token.as_str(), "nope"] {
        let refused: Api<SelfSubjectReview> = Api::all(client_with_token(&server, bad).await);
        let err = refused
            .create(
                &pp,
                &serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1",
                    "kind": "SelfSubjectReview"}))
                .expect("a review"),
            )
            .await
            .expect_err("not a bearer token of this server");
        assert_eq!(api_error(&err).0, 401);
    }
    server.shutdown().await;
}

/// The `scale` subresource of a CRD (`specReplicasPath`, `statusReplicasPath`,
/// `labelSelectorPath`): discovered as `autoscaling/v1` Scale; GET reads the paths, PUT and
/// PATCH write `spec.replicas` through to the object (a new generation), with the resource's
/// conflict, validation and not-found answers.
#[tokio::test]
async fn custom_resources_scale_through_the_scale_subresource() {
    use k8s_openapi::{
        api::autoscaling::v1::Scale,
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    let server = start().await;
    let client = server.client().await.expect("client");
    create_namespace(&client, "org").await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"replicas": {"type": "integer"}}},
                    "status": {"type": "object", "properties": {
                        "replicas": {"type": "integer"}, "selector": {"type": "string"}}}}}},
                "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"}}}]}
    }))
    .expect("a CRD");
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("CRD created");
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(
            crds.clone(),
            "widgets.example.com",
            kube::runtime::wait::conditions::is_crd_established(),
        ),
    )
    .await
    .expect("established within 30 s")
    .expect("CRD watch");
    // The real server publishes a new group's discovery shortly after Established (its
    // discovery handler is updated asynchronously): poll until the group is served.
    let resources = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match client.list_api_group_resources("example.com/v1").await {
                Ok(resources) => return resources,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("discovery failed: {err:?}"),
            }
        }
    })
    .await
    .expect("example.com/v1 discovered within 30 s");
    let entry = resources
        .resources
        .iter()
        .find(|r| r.name == "widgets/scale")
        .expect("widgets/scale listed");
    assert_eq!(
        (
            entry.kind.as_str(),
            entry.group.as_deref(),
            entry.version.as_deref(),
            entry.verbs.clone()
        ),
        (
            "Scale",
            Some("autoscaling"),
            Some("v1"),
            vec!["get".to_owned(), "patch".to_owned(), "update".to_owned()]
        )
    );

    let widgets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "org",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("example.com", "v1", "Widget"),
            "widgets",
        ),
    );
    let widget = |name: &str, data: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": name}}))
        .map(|mut object: DynamicObject| {
            object.data = data;
            object
        })
        .expect("a Widget")
    };
    let created = widgets
        .create(
            &PostParams::default(),
            &widget("w", json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("created");
    widgets
        .create(&PostParams::default(), &widget("empty", json!({})))
        .await
        .expect("created");

    let scale = widgets.get_scale("w").await.expect("scale");
    assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let status = scale.status.clone().expect("status");
    assert_eq!((status.replicas, status.selector), (0, None));
    assert_eq!(scale.metadata.name.as_deref(), Some("w"));
    assert_eq!(scale.metadata.namespace.as_deref(), Some("org"));
    assert_eq!(scale.metadata.uid, created.metadata.uid);
    assert_eq!(
        scale.metadata.resource_version,
        created.metadata.resource_version
    );
    let err = widgets
        .get_scale("empty")
        .await
        .expect_err("no spec.replicas");
    assert_eq!(
        api_error(&err),
        (
            500,
            "InternalError".to_owned(),
            "Internal error occurred: the spec replicas field \".spec.replicas\" does not exist"
                .to_owned()
        )
    );
    let err = widgets.get_scale("nope").await.expect_err("no widget");
    assert_eq!(
        api_error(&err),
        (
            404,
            "NotFound".to_owned(),
            "widgets.example.com \"nope\" not found".to_owned()
        )
    );

    widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 1, "selector": "app=w"}})),
        )
        .await
        .expect("status written");
    let scale = widgets.get_scale("w").await.expect("scale");
    let status = scale.status.clone().expect("status");
    assert_eq!(
        (status.replicas, status.selector.as_deref()),
        (1, Some("app=w"))
    );

    let mut wanted: Scale = scale.clone();
    wanted.spec.as_mut().expect("spec").replicas = Some(5);
    let replaced = widgets
        .replace_scale("w", &PostParams::default(), &wanted)
        .await
        .expect("scaled");
    assert_eq!(replaced.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert_ne!(
        replaced.metadata.resource_version,
        scale.metadata.resource_version
    );
    let err = widgets
        .replace_scale("w", &PostParams::default(), &wanted)
        .await
        .expect_err("stale");
    assert_eq!(
        api_error(&err),
        (
            409,
            "Conflict".to_owned(),
            "Operation cannot be fulfilled on widgets.example.com \"w\": the object has been modified; please apply your changes to the latest version and try again".to_owned()
        )
    );
    let patched = widgets
        .patch_scale(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 7}})),
        )
        .await
        .expect("scaled");
    assert_eq!(patched.spec.as_ref().and_then(|s| s.replicas), Some(7));
    assert_eq!(
        patched.status.clone().and_then(|s| s.selector).as_deref(),
        Some("app=w")
    );
    let mut negative = patched.clone();
    negative.spec.as_mut().expect("spec").replicas = Some(-1);
    negative.metadata.resource_version = None;
    let err = widgets
        .replace_scale("w", &PostParams::default(), &negative)
        .await
        .expect_err("negative");
    assert_eq!(
        api_error(&err),
        (
            422,
            "Invalid".to_owned(),
            "Widget.example.com \"w\" is invalid: .spec.replicas: Invalid value: -1: should be a non-negative integer".to_owned()
        )
    );
    let object = widgets.get("w").await.expect("get");
    assert_eq!(object.data["spec"]["replicas"], 7);
    assert_eq!(object.data["status"]["replicas"], 1);
    assert_eq!(object.metadata.generation, Some(3));
    server.shutdown().await;
}

/// kube-sim's ServiceAccount tokens are signed, not remembered: one issued before a restart with
/// a data directory still authenticates after it, and a token whose claims were edited, or one
/// signed by another kube-sim, does not. (kube-sim only: the data directory is its own.)
#[tokio::test]
async fn service_account_tokens_survive_a_restart_and_cannot_be_forged() {
    use k8s_openapi::api::{
        authentication::v1::{SelfSubjectReview, TokenRequest},
        core::v1::ServiceAccount,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: Some(dir.path().to_owned()),
        ..Config::default()
    };
    let issue = |server: TestServer| async move {
        let client = server.client().await.expect("client");
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        if accounts.get_opt("robot").await.expect("get").is_none() {
            accounts
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "robot"}}))
                        .expect("account"),
                )
                .await
                .expect("created");
        }
        let request: TokenRequest = serde_json::from_value(json!({"spec": {}})).expect("request");
        let issued: TokenRequest = accounts
            .create_subresource("token", "robot", &PostParams::default(), &request)
            .await
            .expect("issued");
        (server, issued.status.expect("status").token)
    };
    let whoami = |server: &TestServer, token: String| {
        let server_kubeconfig = server.kubeconfig_yaml();
        async move {
            let kubeconfig =
                kube::config::Kubeconfig::from_yaml(&server_kubeconfig).expect("kubeconfig");
            let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .expect("config");
            config.auth_info = kube::config::AuthInfo {
                token: Some(token.into()),
                ..Default::default()
            };
            let reviews: Api<SelfSubjectReview> =
                Api::all(kube::Client::try_from(config).expect("client"));
            let review: SelfSubjectReview = serde_json::from_value(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
            )
            .expect("review");
            reviews
                .create(&PostParams::default(), &review)
                .await
                .map(|r| r.status.and_then(|s| s.user_info).and_then(|u| u.username))
        }
    };
    let server = TestServer::Sim(Server::start(config.clone()).await.expect("starts"));
    let (server, token) = issue(server).await;
    server.shutdown().await;
    let restarted = TestServer::Sim(Server::start(config).await.expect("restarts"));
    assert_eq!(
        whoami(&restarted, token.clone())
            .await
            .expect("still valid"),
        Some("system:serviceaccount:default:robot".to_owned())
    );

    // Claims edited (a longer life), signature kept.
    let parts: Vec<&str> = token.split('.').collect();
    let claims = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&engine.decode(parts[1]).expect("base64")).expect("json");
        // Still the same account, audience and a future expiry: only the signature is wrong.
        let exp = claims["exp"].as_i64().expect("exp");
        claims["exp"] = json!(exp + 3600);
        engine.encode(claims.to_string())
    };
    let forged = format!("{}.{claims}.{}", parts[0], parts[2]);
    let err = whoami(&restarted, forged).await.expect_err("forged");
    assert_eq!(api_error(&err).0, 401);

    // Another kube-sim (another key) issues a token for the same name; this one refuses it.
    let other = TestServer::Sim(start_sim().await);
    let (other, foreign) = issue(other).await;
    let err = whoami(&restarted, foreign).await.expect_err("foreign");
    assert_eq!(api_error(&err).0, 401);
    other.shutdown().await;
    restarted.shutdown().await;
}
