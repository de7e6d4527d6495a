//! Strategic merge patch for the built-in kinds, as `kubectl apply`, `kubectl patch` and
//! `kubectl edit` send it: lists with a merge key merge item by item, `finalizers` merge as a
//! set, and the directives `$patch`, `$retainKeys`, `$setElementOrder/..` and
//! `$deleteFromPrimitiveList/..` are honoured. Other lists are replaced, as in a merge patch.

use serde_json::{Map, Value};

/// How a list field merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListStrategy {
    /// Replaced as a whole.
    Replace,
    /// Items of primitive values merged as a set.
    PrimitiveSet,
    /// Items merged by the value of this key.
    MergeKey(&'static str),
}

/// The strategy of a list field of the built-in kinds (looked up by field name, with the items
/// telling `ports` of containers from `ports` of services).
pub fn list_strategy(field: &str, items: &[Value]) -> ListStrategy {
    match field {
        "finalizers" => ListStrategy::PrimitiveSet,
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "secrets" => ListStrategy::MergeKey("name"),
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "ownerReferences" => ListStrategy::MergeKey("uid"),
        "conditions" => ListStrategy::MergeKey("type"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "ports" if items.iter().any(|i| i.get("containerPort").is_some()) => {
            ListStrategy::MergeKey("containerPort")
        }
        "ports" => ListStrategy::MergeKey("port"),
        _ => ListStrategy::Replace,
    }
}

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// Applies a strategic merge patch to `original`.
pub fn apply(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    let mut result = original.clone();
    if !result.is_object() {
        result = Value::Object(Map::new());
    }
    if let Value::Object(map) = &mut result {
        merge_map(map, patch)?;
    }
    Ok(result)
}

/// Removes every directive, for values inserted without an original to merge into.
pub fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, _)| !key.starts_with('$'))
                .map(|(key, value)| (key.clone(), strip_directives(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|item| item.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_map(
    original: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *original = match strip_directives(&Value::Object(patch.clone())) {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            return Ok(());
        }
        Some("delete") => {
            original.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(PatchError(format!("unknown patch type: {other:?}"))),
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) =
                (original.get_mut(field), value)
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                original.remove(key);
            }
            Value::Object(child_patch) => match original.get_mut(key) {
                Some(Value::Object(child)) => merge_map(child, child_patch)?,
                _ => {
                    let mut child = Map::new();
                    merge_map(&mut child, child_patch)?;
                    original.insert(key.clone(), Value::Object(child));
                }
            },
            Value::Array(patch_items) => {
                let merged = match original.get(key) {
                    Some(Value::Array(items)) => merge_list(key, items, patch_items)?,
                    _ => merge_list(key, &[], patch_items)?,
                };
                original.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                original.insert(key.clone(), scalar.clone());
            }
        }
    }
    // Orders and retained keys apply after the merge.
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/")
            && let (Some(Value::Array(items)), Value::Array(order)) =
                (original.get_mut(field), value)
        {
            let strategy = list_strategy(field, items);
            reorder(items, order, &strategy);
        }
    }
    if let Some(Value::Array(retain)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        original.retain(|key, _| keep.contains(&key.as_str()));
    }
    Ok(())
}

fn merge_list(field: &str, original: &[Value], patch: &[Value]) -> Result<Vec<Value>, PatchError> {
    if patch
        .iter()
        .any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|item| item.get("$patch").is_none())
            .map(strip_directives)
            .collect());
    }
    let all: Vec<Value> = original.iter().chain(patch.iter()).cloned().collect();
    match list_strategy(field, &all) {
        ListStrategy::Replace => Ok(patch.iter().map(strip_directives).collect()),
        ListStrategy::PrimitiveSet => {
            let mut merged: Vec<Value> = original.to_vec();
            for item in patch {
                if !merged.contains(item) {
                    merged.push(item.clone());
                }
            }
            Ok(enforce_order(merged, original, patch, |a, b| a == b))
        }
        ListStrategy::MergeKey(merge_key) => {
            let mut merged = original.to_vec();
            for item in patch {
                let Some(key_value) = item.get(merge_key) else {
                    return Err(PatchError(format!(
                        "map: {item} does not contain declared merge key: {merge_key}"
                    )));
                };
                let position = merged
                    .iter()
                    .position(|m| m.get(merge_key) == Some(key_value));
                let directive = item.get("$patch").and_then(Value::as_str);
                match (position, directive) {
                    (Some(i), Some("delete")) => {
                        merged.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        if let (Value::Object(target), Value::Object(item)) = (&mut merged[i], item)
                        {
                            merge_map(target, item)?;
                        }
                    }
                    (None, _) => merged.push(strip_directives(item)),
                }
            }
            Ok(enforce_order(merged, original, patch, |a, b| {
                a.get(merge_key).is_some() && a.get(merge_key) == b.get(merge_key)
            }))
        }
    }
}

/// The order the real server gives a merged list (`normalizeElementOrder` and
/// `mergeSortedSlice` of k8s.io/apimachinery's strategic merge patch): the items the patch
/// names in the patch's order, the others in the original's order, interleaved where both are
/// in the original, otherwise the patch's first. So `[a, b]` patched with `[c]` is `[c, a, b]`,
/// and with `[b', c]` it is `[a, b', c]`.
fn enforce_order(
    merged: Vec<Value>,
    original: &[Value],
    patch: &[Value],
    same: impl Fn(&Value, &Value) -> bool,
) -> Vec<Value> {
    let index_in = |list: &[Value], item: &Value| list.iter().position(|other| same(other, item));
    let (mut named, server_only): (Vec<Value>, Vec<Value>) = merged
        .into_iter()
        .partition(|item| index_in(patch, item).is_some());
    named.sort_by_key(|item| index_in(patch, item));
    let mut out = Vec::with_capacity(named.len() + server_only.len());
    let (mut left, mut right) = (
        server_only.into_iter().peekable(),
        named.into_iter().peekable(),
    );
    loop {
        match (left.peek(), right.peek()) {
            (Some(l), Some(r)) => {
                let first_left = match (index_in(original, l), index_in(original, r)) {
                    (Some(li), Some(ri)) => li < ri,
                    _ => false,
                };
                let next = if first_left {
                    left.next()
                } else {
                    right.next()
                };
                out.extend(next);
            }
            (Some(_), None) => out.extend(left.next()),
            (None, Some(_)) => out.extend(right.next()),
            (None, None) => return out,
        }
    }
}

fn reorder(items: &mut [Value], order: &[Value], strategy: &ListStrategy) {
    let rank = |item: &Value| -> usize {
        order
            .iter()
            .position(|o| match strategy {
                ListStrategy::MergeKey(key) => {
                    o.get(*key).is_some() && o.get(*key) == item.get(*key)
                }
                _ => o == item,
            })
            .unwrap_or(usize::MAX)
    };
    // A stable sort keeps unlisted items in their current order, after the listed ones.
    items.sort_by_key(rank);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Containers merge by name, env by name (a new variable first, as kube-apiserver 1.37 orders
    /// a Deployment's `env` patched with a new one), finalizers as a set; null deletes a key.
    #[test]
    fn lists_merge_by_key_and_null_deletes() {
        let original = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}},
            "spec": {"containers": [{"name": "c1", "image": "i1", "env": [{"name": "A", "value": "1"}]}, {"name": "c2", "image": "i2"}]}});
        let patch = json!({"metadata": {"finalizers": ["b"], "labels": {"y": null}},
            "spec": {"containers": [{"name": "c1", "env": [{"name": "B", "value": "2"}]}, {"name": "c2", "$patch": "delete"}]}});
        let result = apply(&original, &patch).expect("applies");
        assert_eq!(result["metadata"]["finalizers"], json!(["b", "a"]));
        assert_eq!(result["metadata"]["labels"], json!({"x": "1"}));
        assert_eq!(
            result["spec"]["containers"],
            json!([{"name": "c1", "image": "i1", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]}])
        );
    }

    /// Merged lists take the real server's order: new items before the original's others,
    /// items named in the patch where the original had them.
    #[test]
    fn merged_lists_take_the_servers_order() {
        let original = json!({"spec": {"ephemeralContainers": [{"name": "a"}, {"name": "b"}]}});
        let added = apply(
            &original,
            &json!({"spec": {"ephemeralContainers": [{"name": "c"}]}}),
        )
        .expect("applies");
        assert_eq!(
            added["spec"]["ephemeralContainers"],
            json!([{"name": "c"}, {"name": "a"}, {"name": "b"}])
        );
        let changed = apply(
            &original,
            &json!({"spec": {"ephemeralContainers": [{"name": "b", "image": "x"}, {"name": "c"}]}}),
        )
        .expect("applies");
        assert_eq!(
            changed["spec"]["ephemeralContainers"],
            json!([{"name": "a"}, {"name": "b", "image": "x"}, {"name": "c"}])
        );
        let set = apply(
            &json!({"metadata": {"finalizers": ["a", "b"]}}),
            &json!({"metadata": {"finalizers": ["b"]}}),
        )
        .expect("applies");
        assert_eq!(set["metadata"]["finalizers"], json!(["a", "b"]));
    }

    /// The directives kubectl's three-way patches carry are honoured, never stored.
    #[test]
    fn directives_are_honoured() {
        let original = json!({"metadata": {"finalizers": ["a", "b", "c"]}, "data": {"k": "v"}, "spec": {"containers": [{"name": "x"}, {"name": "y"}]}});
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]},
            "data": {"$patch": "replace", "n": "w"},
            "spec": {"$setElementOrder/containers": [{"name": "y"}, {"name": "x"}], "containers": [{"name": "y", "image": "new"}]}});
        let result = apply(&original, &patch).expect("applies");
        assert_eq!(result["metadata"]["finalizers"], json!(["a", "c"]));
        assert_eq!(result["data"], json!({"n": "w"}));
        assert_eq!(
            result["spec"]["containers"],
            json!([{"name": "y", "image": "new"}, {"name": "x"}])
        );
        let retained = apply(
            &json!({"spec": {"a": 1, "b": 2}}),
            &json!({"spec": {"$retainKeys": ["a", "c"], "c": 3}}),
        )
        .expect("applies");
        assert_eq!(retained["spec"], json!({"a": 1, "c": 3}));
    }
}
