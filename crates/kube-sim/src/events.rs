//! `events.k8s.io/v1` Events are a view of the core `v1` Events, as on the real server: one
//! storage, converted field by field, so an event a kube-rs `Recorder` writes shows in
//! `kubectl get events` and `kubectl describe`, and the other way round.

use serde_json::{Map, Value, json};

use crate::{
    api::{self, Part, PatchKind, WriteOptions},
    error::ApiError,
    managed,
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

/// An `events.k8s.io/v1` Event as the core Event it is stored as (the fields renamed; the
/// core struct's empty fields are written when it is stored, by [`shape_core`]).
pub fn to_core(object: &Value) -> Value {
    rename(object, true, "v1")
}

/// A stored core Event as an `events.k8s.io/v1` Event, as the Go struct encodes it: the empty
/// strings and count it omits left out, `eventTime`, `regarding`, `deprecatedSource` and the
/// deprecated timestamps always written.
pub fn from_core(object: &Value) -> Value {
    let mut view = rename(object, false, "events.k8s.io/v1");
    if let Some(map) = view.as_object_mut() {
        for field in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "note",
            "type",
        ] {
            if map.get(field).is_some_and(|v| v.as_str() == Some("")) {
                map.remove(field);
            }
        }
        if map
            .get("deprecatedCount")
            .is_some_and(|v| v.is_null() || v.as_i64() == Some(0))
        {
            map.remove("deprecatedCount");
        }
        for (field, empty) in [
            ("eventTime", Value::Null),
            ("regarding", json!({})),
            ("deprecatedSource", json!({})),
            ("deprecatedFirstTimestamp", Value::Null),
            ("deprecatedLastTimestamp", Value::Null),
        ] {
            map.entry(field).or_insert(empty);
        }
    }
    view
}

/// A core Event as the real server stores it (the Go struct's encoding): `involvedObject`,
/// `source`, the three timestamps and the two reporting strings always written, empty strings
/// and a zero count left out.
pub fn shape_core(object: &mut Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    for field in ["reason", "message", "type", "action"] {
        if map.get(field).is_some_and(|v| v.as_str() == Some("")) {
            map.remove(field);
        }
    }
    if map
        .get("count")
        .is_some_and(|v| v.is_null() || v.as_i64() == Some(0))
    {
        map.remove("count");
    }
    for field in ["series", "related"] {
        if map.get(field).is_some_and(Value::is_null) {
            map.remove(field);
        }
    }
    for (field, empty) in [
        ("involvedObject", json!({})),
        ("source", json!({})),
        ("firstTimestamp", Value::Null),
        ("lastTimestamp", Value::Null),
        ("eventTime", Value::Null),
        ("reportingComponent", json!("")),
        ("reportingInstance", json!("")),
    ] {
        match map.get(field) {
            Some(value) if !value.is_null() => {}
            _ => {
                map.insert(field.to_owned(), empty);
            }
        }
    }
}

/// Whether a resource is the core `v1` events storage.
pub fn is_core(resource: &Resource) -> bool {
    resource.group.is_empty() && resource.plural == "events"
}

fn text<'a>(object: &'a Value, field: &str) -> &'a str {
    object[field].as_str().unwrap_or("")
}

fn is_unset_time(value: &Value) -> bool {
    value.as_str().is_none_or(str::is_empty)
}

/// `IsQualifiedName` of k8s.io/apimachinery, as `reportingController` is checked.
fn qualified_name_errors(value: &str) -> Vec<String> {
    const NAME_RULE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    const SUBDOMAIN_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
    let name_ok = |name: &str| {
        let bytes = name.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let subdomain_ok = |prefix: &str| {
        prefix.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
    };
    let mut errors = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                if prefix.len() > 253 {
                    errors.push("prefix part must be no more than 253 characters".to_owned());
                }
                if !subdomain_ok(prefix) {
                    errors.push(format!("prefix part {SUBDOMAIN_RULE}"));
                }
            }
            name
        }
        _ => {
            return vec![format!(
                "a qualified name {NAME_RULE} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_owned());
    }
    if !name_ok(name) {
        errors.push(format!("name part {NAME_RULE}"));
    }
    errors
}

/// The real server's Event validation (`ValidateEventCreate`/`ValidateEventUpdate` of
/// kube-apiserver) on the core form of an event, with the field names it reports (the internal
/// ones: `message`, `count`, `source`, ...; `reportingComponent` when written through core).
/// Through core, only an event with an `eventTime` is checked beyond its namespace; through
/// `events.k8s.io` creation is strict and most fields are immutable afterwards.
pub fn validate(
    event: &Value,
    old: Option<&Value>,
    through_events_api: bool,
) -> Vec<(String, String)> {
    let mut causes: Vec<(String, String)> = Vec::new();
    let mut cause = |field: &str, message: String| causes.push((field.to_owned(), message));
    let namespace = event["metadata"]["namespace"].as_str().unwrap_or("");
    let involved_namespace = text(&event["involvedObject"], "namespace");
    let mismatch = format!("Invalid value: {involved_namespace:?}: does not match event.namespace");
    let reporting_field = if through_events_api {
        "reportingController"
    } else {
        "reportingComponent"
    };
    if is_unset_time(&event["eventTime"]) {
        let matches = if involved_namespace.is_empty() {
            matches!(namespace, "" | "default")
        } else {
            namespace == involved_namespace
        };
        if !matches {
            cause("involvedObject.namespace", mismatch);
        }
    } else {
        if involved_namespace.is_empty() && !matches!(namespace, "default" | "kube-system") {
            cause("involvedObject.namespace", mismatch);
        }
        let controller = text(event, "reportingComponent");
        if controller.is_empty() {
            cause(reporting_field, "Required value".into());
        }
        for error in qualified_name_errors(controller) {
            cause(
                reporting_field,
                format!("Invalid value: {controller:?}: {error}"),
            );
        }
        let limits = [
            ("reportingInstance", "reportingInstance", 128, true),
            ("action", "action", 128, true),
            ("reason", "reason", 128, true),
            ("message", "message", 1024, false),
        ];
        for (field, path, limit, required) in limits {
            let value = text(event, field);
            if required && value.is_empty() {
                cause(path, "Required value".into());
            }
            if value.len() > limit {
                cause(
                    path,
                    format!("Invalid value: \"\": can have at most {limit} characters"),
                );
            }
        }
    }
    if !through_events_api {
        return causes;
    }
    let series_errors = |cause: &mut dyn FnMut(&str, String)| {
        let series = &event["series"];
        if series.is_object() {
            if series["count"].as_i64().unwrap_or(0) < 2 {
                cause(
                    "series.count",
                    "Invalid value: \"\": should be at least 2".into(),
                );
            }
            if is_unset_time(&series["lastObservedTime"]) {
                cause("series.lastObservedTime", "Required value".into());
            }
        }
    };
    match old {
        None => {
            series_errors(&mut cause);
            if is_unset_time(&event["eventTime"]) {
                cause("eventTime", "Required value".into());
            }
            let kind = text(event, "type");
            if !matches!(kind, "Normal" | "Warning") {
                cause(
                    "type",
                    format!("Invalid value: \"\": has invalid value: {kind}"),
                );
            }
            for field in ["firstTimestamp", "lastTimestamp"] {
                if !is_unset_time(&event[field]) {
                    cause(field, "Invalid value: \"\": needs to be unset".into());
                }
            }
            if event["count"].as_i64().unwrap_or(0) != 0 {
                cause("count", "Invalid value: \"\": needs to be unset".into());
            }
            if !text(&event["source"], "component").is_empty()
                || !text(&event["source"], "host").is_empty()
            {
                cause("source", "Invalid value: \"\": needs to be unset".into());
            }
        }
        Some(old) => {
            if event["series"] != old["series"] {
                series_errors(&mut cause);
            }
            for field in [
                "involvedObject",
                "reason",
                "message",
                "source",
                "firstTimestamp",
                "lastTimestamp",
                "count",
                "type",
                "eventTime",
                "action",
                "related",
                "reportingComponent",
                "reportingInstance",
            ] {
                let empty = |v: &Value| {
                    v.is_null()
                        || v.as_str() == Some("")
                        || v.as_i64() == Some(0)
                        || v.as_object().is_some_and(|m| m.is_empty())
                };
                let (new_value, old_value) = (&event[field], &old[field]);
                if new_value != old_value && !(empty(new_value) && empty(old_value)) {
                    let shown = match new_value {
                        Value::String(text) => format!("{text:?}"),
                        Value::Null => "\"\"".to_owned(),
                        other => go_struct(field, other),
                    };
                    let path = if field == "reportingComponent" {
                        "reportingController"
                    } else {
                        field
                    };
                    cause(path, format!("Invalid value: {shown}: field is immutable"));
                }
            }
        }
    }
    causes
}

/// An object reference or event source as Go's `%v`-ish JSON of the internal struct prints it in
/// an immutability error (capitalised field names, every field present).
fn go_struct(field: &str, value: &Value) -> String {
    let fields: &[(&str, &str)] = match field {
        "involvedObject" | "related" => &[
            ("Kind", "kind"),
            ("Namespace", "namespace"),
            ("Name", "name"),
            ("UID", "uid"),
            ("APIVersion", "apiVersion"),
            ("ResourceVersion", "resourceVersion"),
            ("FieldPath", "fieldPath"),
        ],
        "source" => &[("Component", "component"), ("Host", "host")],
        _ => return value.to_string(),
    };
    let mut out = Map::new();
    for (go, json) in fields {
        out.insert((*go).to_owned(), json!(text(value, json)));
    }
    Value::Object(out).to_string()
}

/// Records an "Update" write of an Event in `managedFields`, in the version it came through
/// (`events.k8s.io/v1` entries name `note`, `regarding`, ...). The real server drops the entries
/// of the other version on such a write (it cannot convert them), and so does kube-sim.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    through_events_api: bool,
    now: &str,
) {
    let version = if through_events_api {
        "events.k8s.io/v1"
    } else {
        "v1"
    };
    let in_version = |object: &Value| {
        let mut object = if through_events_api {
            rename(object, false, version)
        } else {
            object.clone()
        };
        if let Some(entries) = object["metadata"]["managedFields"].as_array_mut() {
            entries.retain(|e| e["apiVersion"] == version);
        }
        object
    };
    let old = old.map(in_version);
    let mut recorded = in_version(new);
    managed::record_update(
        old.as_ref(),
        &mut recorded,
        None,
        managed::Scope::All,
        manager,
        version,
        "",
        now,
    );
    match recorded["metadata"].get("managedFields") {
        Some(entries) => new["metadata"]["managedFields"] = entries.clone(),
        None => {
            if let Some(meta) = new["metadata"].as_object_mut() {
                meta.remove("managedFields");
            }
        }
    }
}

/// Rewords a storage error for the `events.k8s.io` resource (`events.events.k8s.io "x" not
/// found`), as the real server names the resource asked for.
pub fn reword(mut error: ApiError, view: &Resource) -> ApiError {
    if matches!(error.code, 404 | 409) && error.reason != "Invalid" {
        error.message =
            error
                .message
                .replacen("events \"", &format!("{} \"", view.qualified_plural()), 1);
        if let Some(details) = error.details.as_mut() {
            details["group"] = json!(view.group);
        }
    }
    error
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
        let mut expected = v1.clone();
        for (field, empty) in [
            ("deprecatedSource", json!({})),
            ("deprecatedFirstTimestamp", Value::Null),
            ("deprecatedLastTimestamp", Value::Null),
        ] {
            expected[field] = empty;
        }
        assert_eq!(from_core(&core), expected);
    }

    /// `reportingController` is a qualified name, checked as `IsQualifiedName` does.
    #[test]
    fn reporting_controllers_are_qualified_names() {
        assert!(qualified_name_errors("example.com/ctl").is_empty());
        assert!(qualified_name_errors("ctl_1.x").is_empty());
        assert_eq!(
            qualified_name_errors(""),
            vec![
                "name part must be non-empty".to_owned(),
                format!("name part {}", &qualified_name_errors("-")[0][10..])
            ]
        );
        assert_eq!(
            qualified_name_errors("Example.com/x")[0],
            "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        );
        assert_eq!(qualified_name_errors("a/b/c").len(), 1);
    }
}
