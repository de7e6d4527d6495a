//! `apiregistration.k8s.io/v1` APIServices, as kube-apiserver's aggregator keeps them: one per
//! served group-version, `Local` (no service) and `Available`. The built-in group-versions get
//! kube-aggregator's priorities and the label `kube-aggregator.kubernetes.io/automanaged: onstart`;
//! each served version of a CRD gets priority 1000/100 and the label `true`, and loses its
//! APIService when no CRD serves it any more. The same priorities order the groups in discovery.

use serde_json::{Value, json};

use crate::store::Resource;

/// The group of APIServices.
pub const GROUP: &str = "apiregistration.k8s.io";

/// The label the aggregator marks its own APIServices with.
pub const AUTOMANAGED: &str = "kube-aggregator.kubernetes.io/automanaged";

/// kube-aggregator's `groupPriorityMinimum`/`versionPriority` of the built-in group-versions (as
/// kube-apiserver 1.37 lists them).
const PRIORITIES: &[(&str, &str, i64, i64)] = &[
    ("", "v1", 18000, 1),
    ("apps", "v1", 17800, 15),
    ("events.k8s.io", "v1", 17750, 15),
    ("authentication.k8s.io", "v1", 17700, 15),
    ("authorization.k8s.io", "v1", 17600, 15),
    ("autoscaling", "v1", 17500, 15),
    ("autoscaling", "v2", 17500, 30),
    ("batch", "v1", 17400, 15),
    ("certificates.k8s.io", "v1", 17300, 15),
    ("networking.k8s.io", "v1", 17200, 15),
    ("policy", "v1", 17100, 15),
    ("rbac.authorization.k8s.io", "v1", 17000, 15),
    ("storage.k8s.io", "v1", 16800, 15),
    ("admissionregistration.k8s.io", "v1", 16700, 15),
    ("apiextensions.k8s.io", "v1", 16700, 15),
    ("scheduling.k8s.io", "v1", 16600, 15),
    ("coordination.k8s.io", "v1", 16500, 15),
    ("node.k8s.io", "v1", 16300, 15),
    ("discovery.k8s.io", "v1", 16200, 15),
    ("resource.k8s.io", "v1", 16200, 21),
    ("flowcontrol.apiserver.k8s.io", "v1", 16100, 21),
    ("storagemigration.k8s.io", "v1", 15800, 15),
];

/// The priority of a CRD's group-versions.
const CRD_PRIORITY: (i64, i64) = (1000, 100);

/// A built-in group-version's priorities.
fn builtin_priority(group: &str, version: &str) -> Option<(i64, i64)> {
    PRIORITIES
        .iter()
        .find(|(g, v, _, _)| *g == group && *v == version)
        .map(|(_, _, group_priority, version_priority)| (*group_priority, *version_priority))
}

/// Where a group sorts in discovery: the aggregator's own group first, then by
/// `groupPriorityMinimum` (highest first), then by name.
pub fn group_order(group: &str) -> (bool, i64, String) {
    let priority = PRIORITIES
        .iter()
        .filter(|(g, _, _, _)| *g == group)
        .map(|(_, _, p, _)| *p)
        .max()
        .unwrap_or(CRD_PRIORITY.0);
    (group != GROUP, -priority, group.to_owned())
}

/// The APIService's name: `VERSION.GROUP` (`v1.` for the core group).
pub fn name(group: &str, version: &str) -> String {
    format!("{version}.{group}")
}

/// The APIServices the aggregator keeps for these served resources (none for its own group),
/// by name, without server-set metadata.
pub fn desired(resources: &[Resource], created: &str) -> Vec<(String, Value)> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for resource in resources {
        let gv = (resource.group.clone(), resource.version.clone());
        if resource.group != GROUP && !seen.contains(&gv) {
            seen.push(gv);
        }
    }
    seen.into_iter()
        .map(|(group, version)| {
            let (label, (group_priority, version_priority)) =
                match builtin_priority(&group, &version) {
                    Some(priority) => ("onstart", priority),
                    None => ("true", CRD_PRIORITY),
                };
            let mut spec = json!({"groupPriorityMinimum": group_priority, "version": version,
                "versionPriority": version_priority});
            if !group.is_empty() {
                spec["group"] = json!(group);
            }
            let name = name(&group, &version);
            let object = json!({
                "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                "metadata": {"name": name, "labels": {AUTOMANAGED: label}},
                "spec": spec,
                "status": {"conditions": [{"type": "Available", "status": "True",
                    "lastTransitionTime": created, "reason": "Local",
                    "message": "Local APIServices are always available"}]},
            });
            (name, object)
        })
        .collect()
}

/// The `kubectl get apiservices` columns' cells: SERVICE (`Local` or `namespace/name`) and
/// AVAILABLE (the `Available` condition's status, with its reason when not `True`; `Unknown`
/// without one).
pub fn service_and_availability(object: &Value) -> (String, String) {
    let service = &object["spec"]["service"];
    let service = if service.is_object() {
        format!(
            "{}/{}",
            service["namespace"].as_str().unwrap_or(""),
            service["name"].as_str().unwrap_or("")
        )
    } else {
        "Local".to_owned()
    };
    let available = object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Available")
        .map(|c| {
            let status = c["status"].as_str().unwrap_or("");
            match c["reason"].as_str().filter(|r| !r.is_empty()) {
                Some(reason) if status != "True" => format!("{status} ({reason})"),
                _ => status.to_owned(),
            }
        })
        .unwrap_or_else(|| "Unknown".to_owned());
    (service, available)
}
