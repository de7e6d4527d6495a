//! The `scale` subresource of custom resources: an `autoscaling/v1` Scale read from and
//! written to the paths a CRD version's `subresources.scale` names.

use serde_json::{Value, json};

use crate::{error::ApiError, store::Resource};

/// The path segments of a `.spec.replicas`-style path.
fn segments(path: &str) -> Vec<&str> {
    path.split('.').filter(|s| !s.is_empty()).collect()
}

fn lookup<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    segments(path)
        .into_iter()
        .try_fold(object, |value, segment| value.get(segment))
        .filter(|value| !value.is_null())
}

fn path_of<'a>(resource: &'a Resource, field: &str) -> Option<&'a str> {
    resource.scale.as_ref()?.get(field)?.as_str()
}

/// The `specReplicasPath` of the resource.
pub fn spec_path(resource: &Resource) -> &str {
    path_of(resource, "specReplicasPath").unwrap_or(".spec.replicas")
}

/// The Scale of an object: `spec.replicas` from `specReplicasPath` (which must be there),
/// `status.replicas` from `statusReplicasPath` (0 when absent), `status.selector` from
/// `labelSelectorPath` (left out when absent).
pub fn to_scale(resource: &Resource, object: &Value) -> Result<Value, ApiError> {
    let spec_path = spec_path(resource);
    let Some(replicas) = lookup(object, spec_path).and_then(Value::as_i64) else {
        let message = format!("the spec replicas field {spec_path:?} does not exist");
        let mut err = ApiError::internal(format!("Internal error occurred: {message}"));
        err.details = Some(Box::new(json!({"causes": [{"message": message}]})));
        return Err(err);
    };
    let status_replicas = path_of(resource, "statusReplicasPath")
        .and_then(|path| lookup(object, path))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut status = json!({"replicas": status_replicas});
    if let Some(selector) = path_of(resource, "labelSelectorPath")
        .and_then(|path| lookup(object, path))
        .and_then(Value::as_str)
    {
        status["selector"] = json!(selector);
    }
    let meta = &object["metadata"];
    let mut metadata = json!({});
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(value) = meta.get(field) {
            metadata[field] = value.clone();
        }
    }
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata,
        "spec": {"replicas": replicas},
        "status": status,
    }))
}

/// Writes a Scale's `spec.replicas` into the object (at `specReplicasPath`), refusing a
/// negative count as the real server words it.
pub fn apply_scale(
    resource: &Resource,
    object: &mut Value,
    scale: &Value,
    name: &str,
) -> Result<(), ApiError> {
    let path = spec_path(resource).to_owned();
    let replicas = match &scale["spec"]["replicas"] {
        Value::Null => 0,
        value => value.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "Scale in version \"v1\" cannot be handled as a Scale: spec.replicas: {value} is not an integer"
            ))
        })?,
    };
    if replicas < 0 {
        return Err(ApiError::invalid(
            &resource.qualified_kind(),
            name,
            &[(
                path,
                format!("Invalid value: {replicas}: should be a non-negative integer"),
            )],
        ));
    }
    let parts = segments(&path);
    let Some((last, parents)) = parts.split_last() else {
        return Ok(());
    };
    let mut target = object;
    for segment in parents {
        if !target[*segment].is_object() {
            target[*segment] = json!({});
        }
        target = &mut target[*segment];
    }
    target[*last] = json!(replicas);
    Ok(())
}
