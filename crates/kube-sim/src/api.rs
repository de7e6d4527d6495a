//! The Kubernetes REST semantics over the store: create, get, list, update, patch, delete,
//! status subresource, finalizers, generation, and the discovery and OpenAPI documents.

use serde_json::{Value, json};

use crate::{
    error::ApiError,
    schema,
    selector::{FieldSelector, LabelSelector},
    store::{ObjectKey, Resource, Store, now_rfc3339},
};

/// The kinds of patch a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json` (applied as a merge patch; lists replace).
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml` (server-side apply: create or merge).
    Apply,
}

impl PatchKind {
    /// The patch kind of a Content-Type.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Which part of an object a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The main resource (status changes ignored when status is a subresource).
    Main,
    /// The `/status` subresource (only status changes kept).
    Status,
}

fn key_for(resource: &Resource, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        resource: resource.key(),
        namespace: if resource.namespaced {
            namespace.to_owned()
        } else {
            String::new()
        },
        name: name.to_owned(),
    }
}

fn rv_of(object: &Value) -> Option<&str> {
    object["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
}

/// Fills `apiVersion`/`kind`, checks the body's identity against the URL, and applies the
/// resource's admission (Secret `stringData`, CRD schemas).
fn admit(
    store: &Store,
    resource: &Resource,
    object: &mut Value,
    name: &str,
) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind);
    if resource.group.is_empty() && resource.plural == "secrets" {
        fold_string_data(object);
    }
    if resource.plural == "customresourcedefinitions" && resource.group == "apiextensions.k8s.io" {
        let group = object["spec"]["group"].as_str().unwrap_or_default();
        let plural = object["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default();
        if name != format!("{plural}.{group}") {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                name,
                &[(
                    "metadata.name".into(),
                    format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
                )],
            ));
        }
    }
    if let Some(schema) = &resource.schema {
        let causes = schema::admit(schema, object);
        if !causes.is_empty() {
            return Err(ApiError::invalid(&resource.qualified_kind(), name, &causes));
        }
    }
    let _ = store;
    Ok(())
}

fn fold_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = object.get_mut("stringData").map(Value::take) else {
        return;
    };
    if let Some(map) = object.as_object_mut() {
        map.remove("stringData");
    }
    if let Value::Object(entries) = string_data {
        if !object["data"].is_object() {
            object["data"] = json!({});
        }
        for (key, value) in entries {
            let text = value.as_str().unwrap_or_default();
            object["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

/// Whether anything but metadata and status differs (a generation bump).
fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |object: &Value| {
        let mut object = object.clone();
        if let Some(map) = object.as_object_mut() {
            map.remove("metadata");
            map.remove("status");
        }
        object
    };
    strip(old) != strip(new)
}

/// Creates an object.
pub fn create(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    let name = match object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        Some(name) => name.to_owned(),
        None => match object["metadata"]["generateName"].as_str() {
            Some(prefix) => {
                use rand::Rng as _;
                const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                let mut rng = rand::rng();
                let suffix: String = (0..5)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                    .collect();
                format!("{prefix}{suffix}")
            }
            None => {
                return Err(ApiError::invalid(
                    &resource.qualified_kind(),
                    "",
                    &[(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
        },
    };
    if resource.namespaced {
        if namespace.is_empty() {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if let Some(body_ns) = object["metadata"]["namespace"].as_str()
            && !body_ns.is_empty()
            && body_ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        match store.get(&store.namespace_key(namespace)) {
            None => return Err(ApiError::not_found("namespaces", namespace)),
            Some(ns) if ns["metadata"]["deletionTimestamp"].is_string() => {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                        resource.qualified_plural()
                    ),
                ));
            }
            Some(_) => {}
        }
        object["metadata"]["namespace"] = json!(namespace);
    } else if let Some(map) = object["metadata"].as_object_mut() {
        map.remove("namespace");
    }
    object["metadata"]["name"] = json!(name);
    admit(store, resource, &mut object, &name)?;
    let key = key_for(resource, namespace, &name);
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(
            &resource.qualified_plural(),
            &name,
        ));
    }
    if let Some(map) = object["metadata"].as_object_mut() {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            map.remove(field);
        }
    }
    if resource.plural == "namespaces" && resource.group.is_empty() {
        object["status"] = json!({"phase": "Active"});
    }
    let object = store.stamp_new(object);
    store.put(key, object, "ADDED")
}

/// Gets an object.
pub fn get(
    store: &Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    store
        .get(&key_for(resource, namespace, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&resource.qualified_plural(), name))
}

/// List options from the query string.
#[derive(Debug, Default)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit`.
    pub limit: Option<usize>,
    /// `continue`.
    pub continue_from: Option<usize>,
}

/// Lists objects.
pub fn list(
    store: &Store,
    resource: &Resource,
    namespace: Option<&str>,
    options: &ListOptions,
) -> Result<Value, ApiError> {
    let matching: Vec<&Value> = store
        .list(&resource.key(), namespace)
        .into_iter()
        .filter(|object| options.labels.matches(object) && options.fields.matches(object))
        .collect();
    let start = options.continue_from.unwrap_or(0).min(matching.len());
    let end = options.limit.map_or(matching.len(), |limit| {
        (start + limit.max(1)).min(matching.len())
    });
    let mut metadata = json!({"resourceVersion": store.rv().to_string()});
    if end < matching.len() {
        metadata["continue"] = json!(encode_continue(end, store.rv()));
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    Ok(json!({
        "apiVersion": resource.api_version(),
        "kind": format!("{}List", resource.kind),
        "metadata": metadata,
        "items": matching[start..end],
    }))
}

/// Encodes a continue token.
pub fn encode_continue(offset: usize, rv: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{offset}:{rv}"))
}

/// Decodes a continue token into an offset.
pub fn decode_continue(token: &str) -> Result<usize, ApiError> {
    use base64::Engine as _;
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)
}

/// Replaces an object (PUT), honouring the resourceVersion precondition.
pub fn update(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    mut object: Value,
    part: Part,
) -> Result<Value, ApiError> {
    let key = key_for(resource, namespace, name);
    let Some(old) = store.get(&key).cloned() else {
        if part == Part::Main && rv_of(&object).is_none() {
            // PUT of a missing object creates it, as the API server does for most resources.
            object["metadata"]["name"] = json!(name);
            return create(store, resource, namespace, object);
        }
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    if let Some(body_name) = object["metadata"]["name"].as_str()
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let Some(rv) = rv_of(&object)
        && Some(rv) != rv_of(&old)
    {
        return Err(ApiError::conflict(&resource.qualified_plural(), name));
    }
    write(store, resource, key, old, object, part)
}

/// Applies a patch to an object (creating it for server-side apply).
pub fn patch(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    part: Part,
) -> Result<Value, ApiError> {
    let key = key_for(resource, namespace, name);
    let old = store.get(&key).cloned();
    let patch_value: Value = match kind {
        PatchKind::Apply => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
    };
    let Some(old) = old else {
        if kind == PatchKind::Apply && part == Part::Main {
            let mut object = patch_value;
            object["metadata"]["name"] = json!(name);
            return create(store, resource, namespace, object);
        }
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    let mut new = old.clone();
    match kind {
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            let patch_value = if kind == PatchKind::Strategic {
                strip_directives(patch_value)
            } else {
                patch_value
            };
            if let Some(rv) = rv_of(&patch_value)
                && Some(rv) != rv_of(&old)
            {
                return Err(ApiError::conflict(&resource.qualified_plural(), name));
            }
            json_patch::merge(&mut new, &patch_value);
        }
        PatchKind::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch_value)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut new, &operations).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
        }
    }
    // The patch's own resourceVersion was checked above; keep the stored one for the write.
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    write(store, resource, key, old, new, part)
}

/// Removes strategic-merge directives (`$patch`, `$setElementOrder/...`, `$retainKeys`).
fn strip_directives(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(key, _)| !key.starts_with('$'))
                .map(|(key, value)| (key, strip_directives(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_directives).collect()),
        other => other,
    }
}

/// The common tail of update and patch: subresource rules, admission, generation, finalizers.
fn write(
    store: &mut Store,
    resource: &Resource,
    key: ObjectKey,
    old: Value,
    mut new: Value,
    part: Part,
) -> Result<Value, ApiError> {
    let name = key.name.clone();
    if part == Part::Status {
        let status = new.get("status").cloned();
        new = old.clone();
        match status {
            Some(status) => new["status"] = status,
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    } else if resource.status_subresource {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    }
    // Immutable metadata comes from the stored object.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "namespace",
        "name",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(value) => new["metadata"][field] = value.clone(),
            None => {
                if let Some(map) = new["metadata"].as_object_mut() {
                    map.remove(field);
                }
            }
        }
    }
    admit(store, resource, &mut new, &name)?;
    if part == Part::Main && spec_changed(&old, &new) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    let mut compare_old = old.clone();
    compare_old["metadata"]["resourceVersion"] = Value::Null;
    let mut compare_new = new.clone();
    compare_new["metadata"]["resourceVersion"] = Value::Null;
    if compare_old == compare_new {
        // A no-op write does not bump the resourceVersion, as on the real server.
        return Ok(old);
    }
    let finalizers_empty = new["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    if new["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
        store.remove(&key)?;
        return Ok(new);
    }
    store.put(key, new, "MODIFIED")
}

/// Deletes an object: marks it when finalizers remain, removes it otherwise.
pub fn delete(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let key = key_for(resource, namespace, name);
    let Some(mut object) = store.get(&key).cloned() else {
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    if resource.group.is_empty() && resource.plural == "namespaces" {
        for child in store.keys_in_namespace(name) {
            store.remove(&child)?;
        }
        return Ok(store.remove(&key)?.unwrap_or(object));
    }
    let has_finalizers = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok(object);
        }
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        return store.put(key, object, "MODIFIED");
    }
    Ok(store.remove(&key)?.unwrap_or(object))
}

/// The success Status of a delete of an object removed at once.
pub fn deleted_status(resource: &Resource, name: &str, uid: &Value) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
           "details": {"name": name, "group": resource.group, "kind": resource.plural, "uid": uid}})
}

/// Renders a list as a `meta.k8s.io/v1` Table with the resource's printer columns.
pub fn to_table(resource: &Resource, objects: &[Value], list_metadata: Value) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}),
    ];
    let custom: Vec<&Value> = resource
        .printer_columns
        .iter()
        .filter(|c| c["name"] != "Age")
        .collect();
    for column in &custom {
        columns.push(json!({"name": column["name"], "type": column["type"], "format": "", "description": column["description"].as_str().unwrap_or(""), "priority": column["priority"].as_i64().unwrap_or(0)}));
    }
    columns.push(
        json!({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0}),
    );
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            for column in &custom {
                cells.push(json_path(object, column["jsonPath"].as_str().unwrap_or("")).unwrap_or(Value::Null));
            }
            cells.push(json!(age(object["metadata"]["creationTimestamp"].as_str())));
            let mut partial = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"].clone()});
            if let Some(map) = partial["metadata"].as_object_mut() {
                map.remove("managedFields");
            }
            json!({"cells": cells, "object": partial})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata, "columnDefinitions": columns, "rows": rows})
}

/// A human age like kubectl's (`5s`, `3m`, `2h`, `4d`).
fn age(created: Option<&str>) -> String {
    let Some(created) = created.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return "<unknown>".into();
    };
    let seconds = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[?(@.k=="v")].b`.
pub fn json_path(object: &Value, path: &str) -> Option<Value> {
    let mut current = vec![object.clone()];
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("[?(@.") {
            let end = after.find(")]")?;
            let filter = &after[..end];
            let (field, value) = filter.split_once("==")?;
            let value = value.trim().trim_matches('"').trim_matches('\'');
            current = current
                .iter()
                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                .filter(|item| item[field.trim()].as_str() == Some(value))
                .collect();
            rest = after[end + 2..].trim_start_matches('.');
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let index: usize = after[..end].parse().ok()?;
            current = current
                .iter()
                .filter_map(|v| v.get(index).cloned())
                .collect();
            rest = after[end + 1..].trim_start_matches('.');
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let field = &rest[..end];
            current = current
                .iter()
                .filter_map(|v| v.get(field).cloned())
                .collect();
            rest = rest[end..].trim_start_matches('.');
        }
    }
    match current.len() {
        0 => None,
        1 => current.pop(),
        _ => Some(Value::Array(current)),
    }
}

/// `/api/v1` or `/apis/g/v`: the APIResourceList.
pub fn resource_list(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<&Resource> = store
        .resources()
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut items = Vec::new();
    for r in resources {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        let mut entry = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs});
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if r.group == "openchoreo.dev" {
            entry["categories"] = json!(["all", "openchoreo"]);
        }
        items.push(entry);
        if r.status_subresource {
            items.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": items}),
    )
}

/// `/apis`: every non-core group.
pub fn group_list(store: &Store) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in store.resources().iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) => {
                if !versions.contains(&r.version) {
                    versions.push(r.version.clone());
                }
            }
            None => groups.push((r.group.clone(), vec![r.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups.iter().map(|(g, vs)| group_doc(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/g`: one group.
pub fn group_doc(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions, "preferredVersion": versions[0]})
}

/// `/openapi/v3`: the index of per-group-version documents.
pub fn openapi_index(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    for r in store.resources() {
        let path = if r.group.is_empty() {
            format!("api/{}", r.version)
        } else {
            format!("apis/{}/{}", r.group, r.version)
        };
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", store.rv())}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/apis/g/v`: paths that declare `fieldValidation`, so kubectl validates on the
/// server, and the CRD schemas as components.
pub fn openapi_group_version(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<&Resource> = store
        .resources()
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    let params = json!([
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
    ]);
    for r in resources {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let schema_name = format!(
            "{}.{}.{}",
            if r.group.is_empty() {
                "io.k8s.api.core"
            } else {
                &r.group
            },
            r.version,
            r.kind
        );
        let reference = json!({"$ref": format!("#/components/schemas/{schema_name}")});
        let op = |action: &str| json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk, "parameters": params, "requestBody": {"content": {"application/json": {"schema": reference}}}, "responses": {"200": {"description": "OK"}}});
        let collection = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{prefix}/{}", r.plural)
        };
        paths.insert(collection.clone(), json!({"post": op("post"), "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}));
        paths.insert(format!("{collection}/{{name}}"), json!({"put": op("put"), "patch": op("patch"), "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}));
        let mut schema = r.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        schemas.insert(schema_name, schema);
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": schemas}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSONPath subset used by printer columns.
    #[test]
    fn json_path_subset() {
        let object = json!({"spec": {"planeID": "p"}, "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "False"}]}});
        assert_eq!(json_path(&object, ".spec.planeID"), Some(json!("p")));
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(json!("True"))
        );
        assert_eq!(
            json_path(&object, ".status.conditions[1].type"),
            Some(json!("X"))
        );
        assert_eq!(json_path(&object, ".status.missing"), None);
    }

    /// Continue tokens round-trip; garbage is a 400.
    #[test]
    fn continue_tokens_round_trip() {
        assert_eq!(decode_continue(&encode_continue(42, 7)).expect("valid"), 42);
        assert_eq!(decode_continue("!!").expect_err("garbage").code, 400);
    }
}
