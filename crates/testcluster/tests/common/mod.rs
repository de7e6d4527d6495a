//! What any API server must do with our CRDs, checked the same way against kube-sim (always,
//! `tests/kube_sim.rs`) and a real k3s (`tests/k3s.rs`, where Docker answers). The exact 422
//! message is asserted on both, so the workflow's k3s run also proves kube-sim's wording.

use buildplane_api::{BuildPlane, BuildPlaneSpec, BuildPlaneStatus, ClusterAgentConfig, ValueFrom};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn build_plane(name: &str, plane_id: Option<&str>) -> BuildPlane {
    BuildPlane::new(
        name,
        BuildPlaneSpec {
            plane_id: plane_id.map(str::to_owned),
            cluster_agent: ClusterAgentConfig {
                client_ca: ValueFrom {
                    secret_ref: None,
                    value: Some(PEM.to_owned()),
                },
            },
            secret_store_ref: None,
            observability_plane_ref: None,
        },
    )
}

fn api_error(err: &kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.message.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Installs the CRDs, then: create and read back, the schema's 422 with the real wording, the
/// CEL rule, the status subresource leaving spec and generation alone, delete.
pub(crate) async fn buildplane_api_conformance(client: &kube::Client, namespace: &str) {
    buildplane_testcluster::install_crds(client)
        .await
        .expect("CRDs installed and established");
    let api: Api<BuildPlane> = Api::namespaced(client.clone(), namespace);

    let created = api
        .create(
            &PostParams::default(),
            &build_plane("tenant-a", Some("shared-plane")),
        )
        .await
        .expect("a valid BuildPlane is accepted");
    assert_eq!(created.metadata.generation, Some(1));
    let read = api.get("tenant-a").await.expect("read back");
    assert_eq!(
        read.spec,
        build_plane("tenant-a", Some("shared-plane")).spec
    );
    // A sibling with the same planeID (tenancy) and one without (the name is the planeID).
    api.create(
        &PostParams::default(),
        &build_plane("tenant-b", Some("shared-plane")),
    )
    .await
    .expect("a second CR may share the planeID");
    api.create(&PostParams::default(), &build_plane("unnamed", None))
        .await
        .expect("planeID is optional on a BuildPlane");

    let err = api
        .create(&PostParams::default(), &build_plane("bad", Some("Bad_ID")))
        .await
        .expect_err("an invalid planeID is rejected by the schema");
    assert_eq!(
        api_error(&err),
        (
            422,
            r#"BuildPlane.openchoreo.dev "bad" is invalid: spec.planeID: Invalid value: "Bad_ID": spec.planeID in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#
                .to_owned()
        )
    );
    let mut neither = build_plane("neither", Some("p"));
    neither.spec.cluster_agent.client_ca.value = None;
    let err = api
        .create(&PostParams::default(), &neither)
        .await
        .expect_err("the CEL rule rejects a clientCA with neither field");
    let (code, message) = api_error(&err);
    assert_eq!(code, 422, "{message}");
    assert!(
        message.contains("exactly one of secretRef or value must be set"),
        "{message}"
    );

    let status = json!({"status": BuildPlaneStatus {
        observed_generation: Some(1),
        ..BuildPlaneStatus::default()
    }});
    let patched = api
        .patch_status("tenant-a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the status subresource takes a merge patch");
    assert_eq!(patched.status.and_then(|s| s.observed_generation), Some(1));
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "status writes keep the generation"
    );
    let spec_through_status = json!({"spec": {"planeID": "moved"}});
    let ignored = api
        .patch_status(
            "tenant-a",
            &PatchParams::default(),
            &Patch::Merge(&spec_through_status),
        )
        .await
        .expect("spec in a status patch is ignored, not an error");
    assert_eq!(ignored.spec.plane_id.as_deref(), Some("shared-plane"));

    for name in ["tenant-a", "tenant-b", "unnamed"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("deleted");
    }
}
