//! `events.k8s.io/v1` Events are a view of the core `v1` Events, as on the real server: one
//! storage, converted field by field, so an event a kube-rs `Recorder` writes shows in
//! `kubectl get events` and `kubectl describe`, and the other way round.

use serde_json::{Map, Value, json};

use crate::{
    api::{self, Part, PatchKind, WriteOptions},
    error::ApiError,
    store::{Resource, Store},
    strategic,
};

/// `events.k8s.io/v1` field ↔ core `v1` field.
const FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// Whether a resource is the `events.k8s.io` view.
pub fn is_view(resource: &Resource) -> bool {
    resource.group == "events.k8s.io" && resource.plural == "events"
}

/// The core `events` resource that stores the view.
pub fn storage(store: &Store) -> Result<Resource, ApiError> {
    store
        .resource("", "v1", "events")
        .cloned()
        .ok_or_else(|| ApiError::internal("the core events resource is missing"))
}

fn rename(object: &Value, to_core: bool, api_version: &str) -> Value {
    let Some(map) = object.as_object() else {
        return object.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let renamed = FIELDS
            .iter()
            .find_map(|(new, old)| {
                if to_core {
                    (key == new).then_some(*old)
                } else {
                    (key == old).then_some(*new)
                }
            })
            .unwrap_or(key.as_str());
        out.insert(renamed.to_owned(), value.clone());
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

/// An `events.k8s.io/v1` Event as the core Event it is stored as.
pub fn to_core(object: &Value) -> Value {
    rename(object, true, "v1")
}

/// A stored core Event as an `events.k8s.io/v1` Event.
pub fn from_core(object: &Value) -> Value {
    rename(object, false, "events.k8s.io/v1")
}

/// Patches an `events.k8s.io/v1` Event: the patch applies to the view, the result is stored.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &mut Store,
    storage: &Resource,
    namespace: &str,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    options: &mut WriteOptions,
) -> Result<Value, ApiError> {
    let old = from_core(&api::get(store, storage, namespace, name)?);
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let new = match kind {
        PatchKind::Merge => {
            let mut new = old.clone();
            json_patch::merge(&mut new, &patch);
            new
        }
        PatchKind::Strategic => {
            strategic::apply(&old, &patch).map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        PatchKind::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut new = old.clone();
            json_patch::patch(&mut new, &operations).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
            new
        }
        PatchKind::Apply => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "kube-sim does not support server-side apply of events.k8s.io Events; use the core v1 Event",
            ));
        }
    };
    let mut core = to_core(&new);
    if core["metadata"]["resourceVersion"].is_null() {
        core["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    }
    let updated = api::update(store, storage, namespace, name, core, Part::Main, options)?;
    Ok(from_core(&updated))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conversion renames the fields both ways and round-trips.
    #[test]
    fn events_convert_both_ways() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "BuildPlane", "name": "bp"}, "note": "hello", "reason": "R",
            "reportingController": "c", "type": "Normal", "eventTime": "2026-01-01T00:00:00.000000Z"});
        let core = to_core(&v1);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "bp");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "c");
        assert_eq!(from_core(&core), v1);
    }
}
