//! Tests of the BuildPlane API against the seed's manifests and the committed CRDs.

use std::path::{Path, PathBuf};

use buildplane_api::{BuildPlane, CRD_FILES, ClusterBuildPlane, CrKey, PlaneCr, crd_yaml};
use kube::CustomResourceExt;
use serde::Deserialize;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_dir()
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// A document of either kind.
#[derive(Debug)]
enum Plane {
    Namespaced(BuildPlane),
    Cluster(ClusterBuildPlane),
}

impl Plane {
    fn validate(&self) -> Result<(), buildplane_api::ValidationError> {
        match self {
            Plane::Namespaced(cr) => cr.validate(),
            Plane::Cluster(cr) => cr.validate(),
        }
    }
}

fn parse_documents(path: &Path) -> Vec<Plane> {
    let text = std::fs::read_to_string(path).expect("fixture is readable");
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).expect("fixture is YAML");
            match value["kind"].as_str() {
                Some("BuildPlane") => Plane::Namespaced(
                    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{path:?}: {e}")),
                ),
                Some("ClusterBuildPlane") => Plane::Cluster(
                    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{path:?}: {e}")),
                ),
                other => panic!("{path:?}: unexpected kind {other:?}"),
            }
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture directory exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every example manifest of the seed documentation parses and validates.
#[test]
fn every_seed_example_parses_and_validates() {
    let files = yaml_files(&crate_dir().join("test_data/seed"));
    assert_eq!(files.len(), 6, "one fixture per seed example");
    for path in files {
        for plane in parse_documents(&path) {
            plane.validate().unwrap_or_else(|e| panic!("{path:?}: {e}"));
        }
    }
}

/// The seed's multi-tenant example yields two CRs with one planeID and distinct keys.
#[test]
fn multi_tenant_example_shares_one_plane_id() {
    let planes = parse_documents(&crate_dir().join("test_data/seed/multi-tenant.yaml"));
    let keys: Vec<(String, CrKey)> = planes
        .iter()
        .map(|plane| match plane {
            Plane::Namespaced(cr) => (cr.effective_plane_id(), cr.cr_key()),
            Plane::Cluster(cr) => (cr.effective_plane_id(), cr.cr_key()),
        })
        .collect();
    assert_eq!(keys[0].0, "shared-builder");
    assert_eq!(keys[1].0, "shared-builder");
    assert_eq!(keys[0].1.to_string(), "org1/org1-buildplane");
    assert_eq!(keys[1].1.to_string(), "org2/org2-buildplane");
    // secretRef without a namespace resolves in the CR's namespace.
    let Plane::Namespaced(org1) = &planes[0] else {
        panic!("namespaced")
    };
    assert_eq!(
        org1.client_ca_secret(),
        Some((
            Some("org1".into()),
            "shared-cluster-ca".into(),
            "ca.crt".into()
        ))
    );
}

/// Each invalid manifest is rejected with a message that names the field.
#[test]
fn invalid_manifests_are_rejected_naming_the_field() {
    let expected = [
        (
            "both-secretref-and-value.yaml",
            "spec.clusterAgent.clientCA: Invalid value: exactly one",
        ),
        (
            "cluster-secretref-without-namespace.yaml",
            "spec.clusterAgent.clientCA.secretRef.namespace: Required value",
        ),
        (
            "neither.yaml",
            "spec.clusterAgent.clientCA: Invalid value: exactly one",
        ),
    ];
    let files = yaml_files(&crate_dir().join("test_data/invalid"));
    assert_eq!(files.len(), expected.len());
    for (path, (name, message)) in files.iter().zip(expected) {
        assert!(path.ends_with(name), "{path:?}");
        let err = parse_documents(path)[0]
            .validate()
            .expect_err(name)
            .to_string();
        assert!(err.starts_with(message), "{name}: {err}");
    }
}

/// An empty planeID falls back to the CR name (the seed's backwards-compatibility rule).
#[test]
fn effective_plane_id_defaults_to_cr_name() {
    let cr: BuildPlane = serde_yaml::from_str(
        "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: legacy, namespace: org}\nspec:\n  clusterAgent:\n    clientCA: {value: pem}\n",
    )
    .expect("valid YAML");
    assert_eq!(cr.effective_plane_id(), "legacy");
    let mut with_empty = cr.clone();
    with_empty.spec.plane_id = Some(String::new());
    assert_eq!(with_empty.effective_plane_id(), "legacy");
    assert!(
        with_empty.validate().is_err(),
        "an explicit empty planeID is invalid"
    );
}

/// Invalid planeIDs in a manifest are rejected with the field name.
#[test]
fn invalid_plane_ids_in_manifests_are_rejected() {
    for bad in ["Prod", "-x", &"a".repeat(64), ""] {
        let cr: BuildPlane = serde_json::from_value(serde_json::json!({
            "apiVersion": "openchoreo.dev/v1alpha1", "kind": "BuildPlane",
            "metadata": {"name": "bp", "namespace": "org"},
            "spec": {"planeID": bad, "clusterAgent": {"clientCA": {"value": "pem"}}}
        }))
        .expect("valid JSON");
        let err = cr.validate().expect_err(bad);
        assert_eq!(err.field, "spec.planeID", "{bad:?}");
    }
}

/// CR keys round-trip through their display and URL forms.
#[test]
fn cr_keys_round_trip() {
    for key in [CrKey::namespaced("org1", "bp"), CrKey::cluster("shared")] {
        assert_eq!(CrKey::parse(&key.to_string()), Some(key.clone()));
        assert_eq!(
            CrKey::from_url_segments(key.url_namespace(), &key.name),
            key
        );
    }
    assert_eq!(CrKey::cluster("x").to_string(), "/x");
    assert_eq!(CrKey::parse("no-slash"), None);
}

/// The CRD carries the schema rules the API promises.
#[test]
fn crd_schema_enforces_plane_id_and_exactly_one_ca_source() {
    let crd = serde_json::to_value(BuildPlane::crd()).expect("serialisable");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["planeID"]["maxLength"], 63);
    assert_eq!(
        spec["properties"]["planeID"]["pattern"],
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    );
    let client_ca = &spec["properties"]["clusterAgent"]["properties"]["clientCA"];
    assert_eq!(
        client_ca["x-kubernetes-validations"][0]["rule"],
        "has(self.secretRef) != has(self.value)"
    );
    let cluster = serde_json::to_value(ClusterBuildPlane::crd()).expect("serialisable");
    assert_eq!(cluster["spec"]["scope"], "Cluster");
    assert_eq!(
        cluster["spec"]["names"]["shortNames"],
        serde_json::json!(["cbp", "cbps"])
    );
    let required = &cluster["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["required"];
    assert!(
        required
            .as_array()
            .expect("required list")
            .contains(&"planeID".into())
    );
}

/// The generated CRD YAML is snapshotted.
#[test]
fn crd_yaml_snapshot() {
    for (path, generate) in CRD_FILES {
        let name = Path::new(path)
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        insta::assert_snapshot!(name, crd_yaml(&generate()));
    }
}

/// The committed CRD files are what `cargo xtask codegen` would write now.
#[test]
fn committed_crds_are_fresh() {
    for (path, generate) in CRD_FILES {
        let committed = std::fs::read_to_string(repo_root().join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask codegen`"));
        assert!(
            committed == crd_yaml(&generate()),
            "{path} is stale; run `cargo xtask codegen` and commit the result"
        );
    }
}
