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

fn is_deployment(resource: &Resource) -> bool {
    resource.group == "apps" && resource.plural == "deployments"
}

/// A label selector in its string form, requirements sorted by key (`app=web,tier in (a,b)`).
pub fn selector_string(selector: &Value) -> Option<String> {
    let mut requirements: Vec<(String, String)> = Vec::new();
    for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
        requirements.push((
            key.clone(),
            format!("{key}={}", value.as_str().unwrap_or("")),
        ));
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().unwrap_or("").to_owned();
        let mut values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        values.sort_unstable();
        let text = match expression["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            _ => continue,
        };
        requirements.push((key, text));
    }
    if requirements.is_empty() {
        return None;
    }
    requirements.sort();
    Some(
        requirements
            .into_iter()
            .map(|(_, text)| text)
            .collect::<Vec<_>>()
            .join(","),
    )
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
    let deployment = is_deployment(resource);
    // A Deployment's replicas default to 1 (kube-sim stores Deployments without defaults).
    let replicas = lookup(object, spec_path)
        .and_then(Value::as_i64)
        .or(deployment.then_some(1));
    let Some(replicas) = replicas else {
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
    let selector = if deployment {
        selector_string(&object["spec"]["selector"])
    } else {
        path_of(resource, "labelSelectorPath")
            .and_then(|path| lookup(object, path))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(selector) = selector {
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
