//! Structural check of built-in objects: each one must round-trip through its k8s-openapi type
//! without losing a field.
//!
//! kube-sim stores built-in kinds (Deployments, Services, RBAC) without a schema, so `kubectl
//! apply` against it cannot catch a misspelt field there. This check does: k8s-openapi's types
//! ignore unknown fields when deserializing, so a typo (`containerPorts`, `imagePullPolicies`)
//! disappears on the way back and the comparison reports its path; a wrong type fails the
//! deserialization itself. It is a structural check, not the API server's validation (no
//! defaults, no cross-field rules).

use k8s_openapi::api::{apps, core, policy, rbac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why an object failed the check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StructuralError {
    /// A kind this check does not cover.
    #[error("{kind}: no structural check for this kind")]
    UnknownKind {
        /// `apiVersion/kind`.
        kind: String,
    },
    /// The object does not deserialize into its type.
    #[error("{object}: {message}")]
    Type {
        /// `Kind/name`.
        object: String,
        /// serde's message.
        message: String,
    },
    /// Fields the type does not know.
    #[error("{object}: unknown field(s) {}", paths.join(", "))]
    UnknownFields {
        /// `Kind/name`.
        object: String,
        /// JSON paths of the fields lost in the round trip.
        paths: Vec<String>,
    },
}

fn round_trip<T: DeserializeOwned + Serialize>(
    object: &Value,
    name: String,
) -> Result<(), StructuralError> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|err| StructuralError::Type {
        object: name.clone(),
        message: err.to_string(),
    })?;
    let back = serde_json::to_value(&typed).map_err(|err| StructuralError::Type {
        object: name.clone(),
        message: err.to_string(),
    })?;
    let mut paths = Vec::new();
    lost_fields(object, &back, "", &mut paths);
    if paths.is_empty() {
        Ok(())
    } else {
        Err(StructuralError::UnknownFields {
            object: name,
            paths,
        })
    }
}

/// Paths present in `original` but missing from `back`.
fn lost_fields(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(original), Value::Object(back)) => {
            for (key, value) in original {
                let child = format!("{path}.{key}");
                match back.get(key) {
                    Some(other) => lost_fields(value, other, &child, out),
                    None => out.push(child),
                }
            }
        }
        (Value::Array(original), Value::Array(back)) => {
            for (i, (value, other)) in original.iter().zip(back).enumerate() {
                lost_fields(value, other, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks one object of a built-in kind.
pub fn check(object: &Value) -> Result<(), StructuralError> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = format!(
        "{kind}/{}",
        object["metadata"]["name"].as_str().unwrap_or("<unnamed>")
    );
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<core::v1::Namespace>(object, name),
        ("v1", "ConfigMap") => round_trip::<core::v1::ConfigMap>(object, name),
        ("v1", "Secret") => round_trip::<core::v1::Secret>(object, name),
        ("v1", "Service") => round_trip::<core::v1::Service>(object, name),
        ("v1", "ServiceAccount") => round_trip::<core::v1::ServiceAccount>(object, name),
        ("apps/v1", "Deployment") => round_trip::<apps::v1::Deployment>(object, name),
        ("policy/v1", "PodDisruptionBudget") => {
            round_trip::<policy::v1::PodDisruptionBudget>(object, name)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            round_trip::<rbac::v1::ClusterRole>(object, name)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<rbac::v1::ClusterRoleBinding>(object, name)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::v1::Role>(object, name),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            round_trip::<rbac::v1::RoleBinding>(object, name)
        }
        _ => Err(StructuralError::UnknownKind {
            kind: format!("{api_version}/{kind}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A misspelt field inside a pod template is reported with its path.
    #[test]
    fn reports_misspelt_nested_fields() {
        let deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x"},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "i", "containerPorts": []}]}},
            },
        });
        let err = check(&deployment).unwrap_err();
        assert_eq!(
            err,
            StructuralError::UnknownFields {
                object: "Deployment/x".into(),
                paths: vec![".spec.template.spec.containers[0].containerPorts".into()],
            }
        );
    }

    /// A value of the wrong type is reported.
    #[test]
    fn reports_wrong_types() {
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s"},
            "spec": {"ports": [{"port": "eighty"}]},
        });
        assert!(matches!(check(&service), Err(StructuralError::Type { .. })));
    }

    /// A correct object passes, including empty lists and maps.
    #[test]
    fn accepts_correct_objects() {
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "r", "namespace": "n", "labels": {}},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        });
        check(&role).unwrap();
    }
}
