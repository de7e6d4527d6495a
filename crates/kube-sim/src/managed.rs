//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A field set is a set of paths in the `FieldsV1` vocabulary (`f:name`, `k:{"name":"x"}`,
//! `v:"value"`). Apply merges the applied configuration into the live object, removes the fields
//! the same manager applied before and no longer applies (unless another manager owns them),
//! and reports conflicts with fields other managers own and set to different values (409 unless
//! `force=true`, which transfers ownership). Other writes ("Update" operations) take ownership of
//! the fields they change.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::strategic::{ListStrategy, list_strategy};

/// One path segment in `FieldsV1` syntax.
pub type Segment = String;
/// A path from the object root.
pub type FieldPath = Vec<Segment>;
/// A set of owned paths.
pub type FieldSet = BTreeSet<FieldPath>;

/// Which part of the object a write manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `status` (when status is a subresource).
    Main,
    /// Everything (no status subresource).
    All,
    /// Only `status`.
    Status,
}

/// Metadata fields that are identity or server-owned, never managed.
const UNMANAGED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Top-level fields of built-in kinds that are atomic structs (`ObjectReference` of Events), owned
/// as one field.
const ATOMIC_TOP_LEVEL: &[&str] = &["involvedObject", "regarding", "related"];

/// The list strategy of a field: from the CRD schema when there is one, else the built-in table.
fn strategy_for(
    field: &str,
    schema: Option<&Value>,
    items: &[Value],
    in_metadata: bool,
) -> ListStrategy {
    match schema {
        Some(schema) if !in_metadata => match schema["x-kubernetes-list-type"].as_str() {
            Some("set") => ListStrategy::PrimitiveSet,
            Some("map") => {
                match schema["x-kubernetes-list-map-keys"]
                    .as_array()
                    .and_then(|k| k.first())
                    .and_then(Value::as_str)
                {
                    Some("name") => ListStrategy::MergeKey("name"),
                    Some("type") => ListStrategy::MergeKey("type"),
                    Some("uid") => ListStrategy::MergeKey("uid"),
                    Some("key") => ListStrategy::MergeKey("key"),
                    Some("id") => ListStrategy::MergeKey("id"),
                    _ => ListStrategy::Replace,
                }
            }
            _ => ListStrategy::Replace,
        },
        _ => list_strategy(field, items),
    }
}

fn child_schema<'a>(schema: Option<&'a Value>, field: &str) -> Option<&'a Value> {
    let schema = schema?;
    schema["properties"]
        .get(field)
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

fn item_key_segment(item: &Value, key: &str) -> Option<Segment> {
    let value = item.get(key)?;
    let mut map = Map::new();
    map.insert(key.to_owned(), value.clone());
    Some(format!("k:{}", Value::Object(map)))
}

/// The paths an object (or applied configuration) sets, within `scope`.
pub fn fields_of(object: &Value, schema: Option<&Value>, scope: Scope) -> FieldSet {
    let mut set = FieldSet::new();
    let Some(map) = object.as_object() else {
        return set;
    };
    for (key, value) in map {
        let keep = match (key.as_str(), scope) {
            ("apiVersion" | "kind", _) => false,
            ("status", Scope::Main) => false,
            ("status", _) => true,
            (_, Scope::Status) => false,
            _ => true,
        };
        if !keep {
            continue;
        }
        if key == "metadata" {
            if let Some(meta) = value.as_object() {
                for (field, child) in meta {
                    if UNMANAGED_METADATA.contains(&field.as_str()) {
                        continue;
                    }
                    let mut path = vec!["f:metadata".to_owned(), format!("f:{field}")];
                    walk(child, field, None, true, &mut path, &mut set);
                }
            }
            continue;
        }
        let mut path = vec![format!("f:{key}")];
        walk(
            value,
            key,
            child_schema(schema, key),
            false,
            &mut path,
            &mut set,
        );
    }
    set
}

fn walk(
    value: &Value,
    field: &str,
    schema: Option<&Value>,
    in_metadata: bool,
    path: &mut FieldPath,
    set: &mut FieldSet,
) {
    let atomic =
        schema.is_none() && !in_metadata && path.len() == 1 && ATOMIC_TOP_LEVEL.contains(&field);
    match value {
        Value::Object(map) if !map.is_empty() && !atomic => {
            for (key, child) in map {
                path.push(format!("f:{key}"));
                walk(
                    child,
                    key,
                    child_schema(schema, key),
                    in_metadata,
                    path,
                    set,
                );
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            match strategy_for(field, schema, items, in_metadata) {
                ListStrategy::Replace => {
                    set.insert(path.clone());
                }
                ListStrategy::PrimitiveSet => {
                    for item in items {
                        path.push(format!("v:{item}"));
                        set.insert(path.clone());
                        path.pop();
                    }
                }
                ListStrategy::MergeKey(key) => {
                    let item_schema = schema.and_then(|s| s.get("items"));
                    for item in items {
                        let Some(segment) = item_key_segment(item, key) else {
                            set.insert(path.clone());
                            continue;
                        };
                        path.push(segment);
                        set.insert(path.clone());
                        if let Some(fields) = item.as_object() {
                            for (k, child) in fields {
                                path.push(format!("f:{k}"));
                                walk(
                                    child,
                                    k,
                                    child_schema(item_schema, k),
                                    in_metadata,
                                    path,
                                    set,
                                );
                                path.pop();
                            }
                        }
                        path.pop();
                    }
                }
            }
        }
        _ => {
            set.insert(path.clone());
        }
    }
}

/// Finds the value at a path.
pub fn get<'a>(object: &'a Value, path: &[Segment]) -> Option<&'a Value> {
    let mut current = object;
    for segment in path {
        current = step(current, segment)?;
    }
    Some(current)
}

fn step<'a>(value: &'a Value, segment: &str) -> Option<&'a Value> {
    if let Some(field) = segment.strip_prefix("f:") {
        return value.get(field);
    }
    let items = value.as_array()?;
    if let Some(key) = segment.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        return items
            .iter()
            .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)));
    }
    if let Some(raw) = segment.strip_prefix("v:") {
        let wanted: Value = serde_json::from_str(raw).ok()?;
        return items.iter().find(|item| **item == wanted);
    }
    None
}

/// Removes the value at a path (a field, a list item or a set value); false when absent.
pub fn remove(object: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = object;
    for segment in parents {
        let next = if let Some(field) = segment.strip_prefix("f:") {
            current.get_mut(field)
        } else {
            match position(current, segment) {
                Some(index) => current.get_mut(index),
                None => None,
            }
        };
        let Some(next) = next else { return false };
        current = next;
    }
    if let Some(field) = last.strip_prefix("f:") {
        return current
            .as_object_mut()
            .is_some_and(|m| m.remove(field).is_some());
    }
    match position(current, last) {
        Some(index) => current.as_array_mut().map(|a| a.remove(index)).is_some(),
        None => false,
    }
}

fn position(value: &Value, segment: &str) -> Option<usize> {
    let items = value.as_array()?;
    let found = step(value, segment)?;
    items.iter().position(|item| std::ptr::eq(item, found))
}

/// Converts a field set to `FieldsV1` JSON.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for segment in path {
            let entry = node
                .entry(segment.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(child) = entry else { break };
            node = child;
        }
    }
    // A path that is also a prefix of others is marked with ".".
    fn mark(node: &mut Map<String, Value>, path: &mut FieldPath, set: &FieldSet) {
        for (key, child) in node.iter_mut() {
            path.push(key.clone());
            if let Value::Object(child) = child
                && !child.is_empty()
            {
                if set.contains(path) {
                    child.insert(".".into(), json!({}));
                }
                mark(child, path, set);
            }
            path.pop();
        }
    }
    mark(&mut root, &mut Vec::new(), set);
    Value::Object(root)
}

/// Reads `FieldsV1` JSON into a field set.
pub fn from_fields_v1(value: &Value) -> FieldSet {
    fn read(node: &Value, path: &mut FieldPath, set: &mut FieldSet) {
        let Some(map) = node.as_object() else { return };
        if map.is_empty() && !path.is_empty() {
            set.insert(path.clone());
        }
        for (key, child) in map {
            if key == "." {
                if !path.is_empty() {
                    set.insert(path.clone());
                }
                continue;
            }
            path.push(key.clone());
            read(child, path, set);
            path.pop();
        }
    }
    let mut set = FieldSet::new();
    read(value, &mut Vec::new(), &mut set);
    set
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The manager's name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `apiVersion` of the write.
    pub api_version: String,
    /// When the entry last changed.
    pub time: String,
    /// `""` or `"status"`.
    pub subresource: String,
    /// The owned fields.
    pub fields: FieldSet,
}

impl Entry {
    /// Whether this entry is the given manager's, for this operation and subresource.
    pub fn same_owner(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

/// Reads `metadata.managedFields`.
pub fn read_entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some(Entry {
                manager: e["manager"].as_str()?.to_owned(),
                operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
                api_version: e["apiVersion"].as_str().unwrap_or("").to_owned(),
                time: e["time"].as_str().unwrap_or("").to_owned(),
                subresource: e["subresource"].as_str().unwrap_or("").to_owned(),
                fields: from_fields_v1(&e["fieldsV1"]),
            })
        })
        .collect()
}

/// Writes `metadata.managedFields` (entries owning nothing are dropped), in the real server's
/// order: by operation (`Apply` before `Update`), then time to the second, manager, apiVersion
/// and subresource (`sortEncodedManagedFields` in k8s.io/apiserver's fieldmanager).
pub fn write_entries(object: &mut Value, entries: &[Entry]) {
    let mut kept: Vec<&Entry> = entries.iter().filter(|e| !e.fields.is_empty()).collect();
    kept.sort_by(|p, q| {
        (
            &p.operation,
            &p.time,
            &p.manager,
            &p.api_version,
            &p.subresource,
        )
            .cmp(&(
                &q.operation,
                &q.time,
                &q.manager,
                &q.api_version,
                &q.subresource,
            ))
    });
    let rendered: Vec<Value> = kept
        .into_iter()
        .map(|e| {
            let mut entry = json!({"manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.fields)});
            if !e.subresource.is_empty() {
                entry["subresource"] = json!(e.subresource);
            }
            entry
        })
        .collect();
    if rendered.is_empty() {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(rendered);
    }
}

/// The leaf paths at which `new` differs from `old`, and the paths `old` had that `new` lacks.
fn changes(old: &Value, new: &Value, schema: Option<&Value>, scope: Scope) -> (FieldSet, FieldSet) {
    let old_fields = fields_of(old, schema, scope);
    let new_fields = fields_of(new, schema, scope);
    let changed = new_fields
        .iter()
        .filter(|path| get(old, path) != get(new, path) || !old_fields.contains(*path))
        .cloned()
        .collect();
    let removed = old_fields.difference(&new_fields).cloned().collect();
    (changed, removed)
}

/// Records an "Update" write by `manager`: it takes ownership of what it changed.
#[allow(clippy::too_many_arguments)]
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    schema: Option<&Value>,
    scope: Scope,
    manager: &str,
    api_version: &str,
    subresource: &str,
    now: &str,
) {
    let empty = json!({});
    let old_value = old.unwrap_or(&empty);
    let mut entries = old.map(read_entries).unwrap_or_default();
    let (changed, removed) = changes(old_value, new, schema, scope);
    if changed.is_empty() && removed.is_empty() {
        write_entries(new, &entries);
        return;
    }
    for entry in &mut entries {
        entry
            .fields
            .retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    match entries
        .iter_mut()
        .find(|e| e.same_owner(manager, "Update", subresource))
    {
        Some(entry) => {
            entry.fields.extend(changed);
            entry.time = now.to_owned();
            entry.api_version = api_version.to_owned();
        }
        None => entries.push(Entry {
            manager: manager.to_owned(),
            operation: "Update".into(),
            api_version: api_version.to_owned(),
            time: now.to_owned(),
            subresource: subresource.to_owned(),
            fields: changed,
        }),
    }
    write_entries(new, &entries);
}

/// A field set to different values by another manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// Its operation (`Apply` or `Update`).
    pub operation: String,
    /// Its subresource (`""` for the main resource).
    pub subresource: String,
    /// Its apiVersion.
    pub api_version: String,
    /// The field, as `.spec.planeID`.
    pub field: String,
}

/// The order of structured-merge-diff's `Set.Iterate`: a node's members (paths ending there)
/// before its children, each sorted by segment.
fn iteration_order(p: &[Segment], q: &[Segment]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (i, (a, b)) in p.iter().zip(q).enumerate() {
        let (p_ends, q_ends) = (i + 1 == p.len(), i + 1 == q.len());
        match (p_ends, q_ends) {
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => match a.cmp(b) {
                Ordering::Equal => {}
                other => return other,
            },
        }
    }
    p.len().cmp(&q.len())
}

fn display_path(path: &[Segment]) -> String {
    path.iter()
        .map(|s| match s.strip_prefix("f:") {
            Some(field) => format!(".{field}"),
            None => format!("[{}]", &s[2..]),
        })
        .collect()
}

/// Applies `applied` as `manager` to `live` (`None` when creating); returns the new object with
/// its managedFields, or the conflicts.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    schema: Option<&Value>,
    scope: Scope,
    manager: &str,
    force: bool,
    api_version: &str,
    subresource: &str,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let mut entries = live.map(read_entries).unwrap_or_default();
    let applied_fields = fields_of(applied, schema, scope);
    let mut result = live.cloned().unwrap_or_else(|| json!({}));

    // Conflicts: fields another manager owns whose live value differs from the applied one.
    let mut conflicts = Vec::new();
    let mut conflicting = FieldSet::new();
    if let Some(live) = live {
        for path in &applied_fields {
            let (Some(current), Some(wanted)) = (get(live, path), get(applied, path)) else {
                continue;
            };
            if current == wanted || current.is_object() {
                continue;
            }
            for entry in &entries {
                if entry.same_owner(manager, "Apply", subresource) || !entry.fields.contains(path) {
                    continue;
                }
                conflicting.insert(path.clone());
                conflicts.push((
                    path.clone(),
                    Conflict {
                        manager: entry.manager.clone(),
                        operation: entry.operation.clone(),
                        subresource: entry.subresource.clone(),
                        api_version: entry.api_version.clone(),
                        field: display_path(path),
                    },
                ));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        // In the order the real server's field sets iterate: at each level the fields that end
        // there before those that go deeper, each by name.
        conflicts.sort_by(|(p, _), (q, _)| iteration_order(p, q));
        return Err(conflicts.into_iter().map(|(_, c)| c).collect());
    }

    // Fields this manager applied before and no longer applies are removed, unless shared.
    let previous = entries
        .iter()
        .find(|e| e.same_owner(manager, "Apply", subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut dropped: Vec<&FieldPath> = previous.difference(&applied_fields).collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        let shared = entries.iter().any(|e| {
            !e.same_owner(manager, "Apply", subresource)
                && e.fields.iter().any(|p| p.starts_with(path))
        });
        if !shared {
            remove(&mut result, path);
        }
    }

    merge(&mut result, applied, schema, "", false);

    for entry in &mut entries {
        if !entry.same_owner(manager, "Apply", subresource) {
            entry.fields.retain(|p| !conflicting.contains(p));
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.same_owner(manager, "Apply", subresource))
    {
        Some(entry) => {
            entry.fields = applied_fields;
            entry.time = now.to_owned();
            entry.api_version = api_version.to_owned();
        }
        None => entries.push(Entry {
            manager: manager.to_owned(),
            operation: "Apply".into(),
            api_version: api_version.to_owned(),
            time: now.to_owned(),
            subresource: subresource.to_owned(),
            fields: applied_fields,
        }),
    }
    write_entries(&mut result, &entries);
    Ok(result)
}

/// Merges an applied configuration into an object: maps deeply, keyed lists by key, sets as
/// sets, other lists and scalars replace.
fn merge(
    target: &mut Value,
    applied: &Value,
    schema: Option<&Value>,
    field: &str,
    in_metadata: bool,
) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (key, value) in applied {
                if value.is_null() {
                    target.remove(key);
                    continue;
                }
                let child_in_metadata = in_metadata || (field.is_empty() && key == "metadata");
                let schema = if field.is_empty() && key == "metadata" {
                    None
                } else {
                    child_schema(schema, key)
                };
                match target.get_mut(key) {
                    Some(existing) => merge(existing, value, schema, key, child_in_metadata),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(applied)) => {
            let all: Vec<Value> = target.iter().chain(applied.iter()).cloned().collect();
            match strategy_for(field, schema, &all, in_metadata) {
                ListStrategy::Replace => *target = applied.clone(),
                ListStrategy::PrimitiveSet => {
                    for item in applied {
                        if !target.contains(item) {
                            target.push(item.clone());
                        }
                    }
                }
                ListStrategy::MergeKey(key) => {
                    let item_schema = schema.and_then(|s| s.get("items"));
                    for item in applied {
                        match target
                            .iter_mut()
                            .find(|t| t.get(key).is_some() && t.get(key) == item.get(key))
                        {
                            Some(existing) => merge(existing, item, item_schema, "", in_metadata),
                            None => target.push(item.clone()),
                        }
                    }
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    /// FieldsV1 round-trips, with "." marking owned list items that have children.
    #[test]
    fn fields_v1_round_trips() {
        let object = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "1"}, "finalizers": ["f"]},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let set = fields_of(&object, None, Scope::Main);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"f\"": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:name": {}, "f:image": {}}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    /// Re-applying without a field removes it; another manager's differing value conflicts.
    #[test]
    fn apply_removes_dropped_fields_and_detects_conflicts() {
        let first = apply(
            None,
            &json!({"spec": {"a": 1, "b": 2}}),
            None,
            Scope::Main,
            "m",
            false,
            "v1",
            "",
            NOW,
        )
        .expect("applies");
        let second = apply(
            Some(&first),
            &json!({"spec": {"a": 1}}),
            None,
            Scope::Main,
            "m",
            false,
            "v1",
            "",
            NOW,
        )
        .expect("applies");
        assert_eq!(second["spec"], json!({"a": 1}));
        let mut updated = second.clone();
        updated["spec"]["a"] = json!(5);
        record_update(
            Some(&second),
            &mut updated,
            None,
            Scope::Main,
            "other",
            "v1",
            "",
            NOW,
        );
        let conflicts = apply(
            Some(&updated),
            &json!({"spec": {"a": 1}}),
            None,
            Scope::Main,
            "m",
            false,
            "v1",
            "",
            NOW,
        )
        .expect_err("conflict");
        assert_eq!(
            conflicts,
            vec![Conflict {
                manager: "other".into(),
                operation: "Update".into(),
                subresource: String::new(),
                api_version: "v1".into(),
                field: ".spec.a".into()
            }]
        );
        let forced = apply(
            Some(&updated),
            &json!({"spec": {"a": 1}}),
            None,
            Scope::Main,
            "m",
            true,
            "v1",
            "",
            NOW,
        )
        .expect("forced");
        assert_eq!(forced["spec"]["a"], 1);
        let owners: Vec<String> = read_entries(&forced)
            .into_iter()
            .map(|e| e.manager)
            .collect();
        assert_eq!(owners, vec!["m".to_owned()], "force moved ownership");
    }

    /// Entries come out as the real server orders them: Apply before Update, older before
    /// newer (to the second), then by manager; the order they were recorded in does not count.
    #[test]
    fn entries_are_written_in_the_servers_order() {
        let entry = |manager: &str, operation: &str, time: &str| Entry {
            manager: manager.into(),
            operation: operation.into(),
            api_version: "v1".into(),
            time: time.into(),
            subresource: String::new(),
            fields: [vec!["f:data".to_owned(), format!("f:{manager}")]]
                .into_iter()
                .collect(),
        };
        let mut object = json!({"metadata": {}});
        write_entries(
            &mut object,
            &[
                entry("kubectl", "Update", "2026-01-01T00:00:00Z"),
                entry("alice", "Apply", "2026-01-01T00:00:09Z"),
                entry("carol", "Apply", "2026-01-01T00:00:01Z"),
                entry("bob", "Apply", "2026-01-01T00:00:01Z"),
            ],
        );
        let order: Vec<String> = read_entries(&object)
            .into_iter()
            .map(|e| e.manager)
            .collect();
        assert_eq!(order, ["bob", "carol", "alice", "kubectl"]);
    }
}
