//! Discovery (`/api`, `/apis`, per group-version resource lists, and the aggregated
//! `apidiscovery.k8s.io/v2` documents kubectl asks for first) and the OpenAPI v3 documents
//! kubectl's `apply` uses to decide on server-side field validation.

use serde_json::{Value, json};

use crate::store::{Resource, Store};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn verbs(resource: &Resource) -> Vec<&'static str> {
    if resource.create_only {
        vec!["create"]
    } else if resource.read_only {
        vec!["get", "list"]
    } else {
        VERBS.to_vec()
    }
}

/// The Content-Type of aggregated discovery responses.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether an Accept header asks for aggregated discovery v2.
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let params: Vec<&str> = range.split(';').map(str::trim).collect();
        params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
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
        let mut entry = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs(r)});
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        items.push(entry);
        // The real server lists subresources by name: `approval` before `status` before `token`.
        let mut subresources: Vec<Value> = r
            .subresources
            .iter()
            .map(|s| {
                let mut entry = json!({"name": format!("{}/{}", r.plural, s.name), "singularName": "", "namespaced": r.namespaced, "kind": s.kind, "verbs": s.verbs});
                if s.group != r.group || s.version != r.version {
                    entry["group"] = json!(s.group);
                    entry["version"] = json!(s.version);
                }
                entry
            })
            .collect();
        if r.status_subresource {
            subresources.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        subresources.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        items.extend(subresources);
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": items}),
    )
}

/// Groups with their versions, in order of first appearance (the preferred version first).
fn groups(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in store.resources() {
        match groups.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) => {
                if !versions.contains(&r.version) {
                    versions.push(r.version.clone());
                }
            }
            None => groups.push((r.group.clone(), vec![r.version.clone()])),
        }
    }
    // As the aggregator orders them: its own group, then by APIService priority and name.
    groups.sort_by_key(|(group, _)| crate::apiservices::group_order(group));
    groups
}

/// `/apis`: every non-core group.
pub fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = groups(store)
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_doc(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The versions of one group, if served.
pub fn group_versions(store: &Store, group: &str) -> Option<Vec<String>> {
    groups(store)
        .into_iter()
        .find(|(g, _)| g == group)
        .map(|(_, versions)| versions)
}

/// `/apis/g`: one group.
pub fn group_doc(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions, "preferredVersion": versions.first()})
}

/// `/api` or `/apis` as an `apidiscovery.k8s.io/v2` APIGroupDiscoveryList.
pub fn aggregated(store: &Store, core: bool) -> Value {
    let items: Vec<Value> = groups(store)
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|version| {
                    let resources: Vec<Value> = store
                        .resources()
                        .iter()
                        .filter(|r| r.group == group && &r.version == version)
                        .map(|r| {
                            let kind = json!({"group": r.group, "version": r.version, "kind": r.kind});
                            let mut entry = json!({
                                "resource": r.plural,
                                "responseKind": kind,
                                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": r.singular,
                                "verbs": verbs(r),
                            });
                            if !r.short_names.is_empty() {
                                entry["shortNames"] = json!(r.short_names);
                            }
                            if !r.categories.is_empty() {
                                entry["categories"] = json!(r.categories);
                            }
                            let mut subresources: Vec<Value> = r
                                .subresources
                                .iter()
                                .map(|s| json!({"subresource": s.name, "responseKind": {"group": s.group, "version": s.version, "kind": s.kind}, "verbs": s.verbs}))
                                .collect();
                            if r.status_subresource {
                                subresources.push(json!({"subresource": "status", "responseKind": kind, "verbs": ["get", "patch", "update"]}));
                            }
                            subresources.sort_by(|a, b| a["subresource"].as_str().cmp(&b["subresource"].as_str()));
                            if !subresources.is_empty() {
                                entry["subresources"] = json!(subresources);
                            }
                            entry
                        })
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
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

/// `/openapi/v3/apis/g/v`: paths that declare `fieldValidation` (so kubectl leaves validation
/// to the server) and the CRD schemas as components.
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
        let body = |types: &[&str]| {
            let content: serde_json::Map<String, Value> = types
                .iter()
                .map(|t| ((*t).to_owned(), json!({"schema": reference})))
                .collect();
            json!({"content": content})
        };
        let op = |action: &str, types: &[&str]| json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk, "parameters": params, "requestBody": body(types), "responses": {"200": {"description": "OK"}}});
        let patch_types = [
            "application/apply-patch+yaml",
            "application/json-patch+json",
            "application/merge-patch+json",
        ];
        let collection = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{prefix}/{}", r.plural)
        };
        paths.insert(collection.clone(), json!({"post": op("post", &["*/*"]), "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}));
        paths.insert(format!("{collection}/{{name}}"), json!({"put": op("put", &["*/*"]), "patch": op("patch", &patch_types), "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}, "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}));
        if r.status_subresource {
            paths.insert(format!("{collection}/{{name}}/status"), json!({"put": op("put", &["*/*"]), "patch": op("patch", &patch_types), "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}}}));
        }
        let mut schema = r.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        if let Some(properties) = schema["properties"].as_object_mut() {
            properties.insert("apiVersion".into(), json!({"type": "string"}));
            properties.insert("kind".into(), json!({"type": "string"}));
            properties.insert("metadata".into(), json!({"type": "object"}));
        }
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

    /// kubectl 1.32's Accept header selects aggregated discovery; plain JSON does not.
    #[test]
    fn aggregated_discovery_is_negotiated() {
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json, */*"));
        assert!(!wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
        ));
    }

    /// The core group is the only item of `/api`; `/apis` lists the others.
    #[test]
    fn aggregated_documents_split_core_and_groups() {
        let store = Store::open(None).expect("store");
        let core = aggregated(&store, true);
        assert_eq!(core["items"].as_array().map(Vec::len), Some(1));
        assert_eq!(core["items"][0]["versions"][0]["version"], "v1");
        let groups = aggregated(&store, false);
        assert!(
            groups["items"]
                .as_array()
                .expect("items")
                .iter()
                .any(|g| g["metadata"]["name"] == "coordination.k8s.io")
        );
    }
}
