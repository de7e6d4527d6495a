//! CRD schema enforcement: defaults, pruning of unknown fields, types, required, pattern,
//! length, enum, and `x-kubernetes-validations` CEL rules, with the real server's messages.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::Value;

/// Applies defaults and prunes unknown fields, then validates; returns `(field, message)` causes.
pub fn admit(schema: &Value, object: &mut Value) -> Vec<(String, String)> {
    let mut causes = Vec::new();
    if let Some(properties) = schema["properties"].as_object() {
        if let Some(map) = object.as_object_mut() {
            for (name, property) in properties {
                if matches!(name.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                if let Some(value) = map.get_mut(name) {
                    normalise(property, value);
                    check(property, value, name, &mut causes);
                } else if let Some(default) = property.get("default") {
                    map.insert(name.clone(), default.clone());
                }
            }
            let keep: Vec<String> = properties.keys().cloned().collect();
            map.retain(|key, _| {
                matches!(key.as_str(), "metadata" | "apiVersion" | "kind") || keep.contains(key)
            });
        }
        for required in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if object.get(required).is_none() {
                causes.push((required.to_owned(), "Required value".to_owned()));
            }
        }
    }
    causes
}

/// Applies defaults and prunes unknown fields below one node.
fn normalise(schema: &Value, value: &mut Value) {
    if schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    match map.get_mut(name) {
                        Some(child) => normalise(property, child),
                        None => {
                            if let Some(default) = property.get("default") {
                                map.insert(name.clone(), default.clone());
                            }
                        }
                    }
                }
                if !schema["additionalProperties"].is_object() {
                    map.retain(|key, _| properties.contains_key(key));
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    normalise(additional, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    normalise(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates one node and its children.
fn check(schema: &Value, value: &Value, path: &str, causes: &mut Vec<(String, String)>) {
    if value.is_null() {
        if schema["nullable"].as_bool() != Some(true) && schema.get("type").is_some() {
            causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                    schema["type"].as_str().unwrap_or("object")
                ),
            ));
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str() {
        let actual = type_of(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok && schema["x-kubernetes-int-or-string"].as_bool() != Some(true) {
            causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: {}: {path} in body must be of type {expected}: \"{actual}\"",
                    describe(value)
                ),
            ));
            return;
        }
    }
    if let Some(text) = value.as_str() {
        if let Some(max) = schema["maxLength"].as_u64()
            && text.chars().count() as u64 > max
        {
            causes.push((
                path.to_owned(),
                format!("Too long: may not be more than {max} bytes"),
            ));
        }
        if let Some(min) = schema["minLength"].as_u64()
            && (text.chars().count() as u64) < min
        {
            causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: {}: {path} in body should be at least {min} chars long",
                    describe(value)
                ),
            ));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            match regex::Regex::new(pattern) {
                Ok(re) if !re.is_match(text) => causes.push((
                    path.to_owned(),
                    format!(
                        "Invalid value: {}: {path} in body should match '{pattern}'",
                        describe(value)
                    ),
                )),
                Ok(_) => {}
                Err(err) => causes.push((
                    path.to_owned(),
                    format!("Internal error: invalid pattern {pattern:?}: {err}"),
                )),
            }
        }
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        let listed = options
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        causes.push((
            path.to_owned(),
            format!(
                "Unsupported value: {}: supported values: {listed}",
                describe(value)
            ),
        ));
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    if let Some(child) = map.get(name) {
                        check(property, child, &format!("{path}.{name}"), causes);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (name, child) in map {
                    check(additional, child, &format!("{path}.{name}"), causes);
                }
            }
            for required in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !map.contains_key(required) {
                    causes.push((format!("{path}.{required}"), "Required value".to_owned()));
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(expression) = rule["rule"].as_str() else {
            continue;
        };
        if expression.contains("oldSelf") {
            // Transition rules need the old object; creation-time validation skips them.
            continue;
        }
        match eval_rule(expression, value) {
            Ok(true) => {}
            Ok(false) => {
                let message = rule["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("failed rule: {expression}"));
                causes.push((
                    path.to_owned(),
                    format!("Invalid value: {}: {message}", describe(value)),
                ));
            }
            Err(err) => causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: {}: rule {expression:?}: {err}",
                    describe(value)
                ),
            )),
        }
    }
}

/// Evaluates one CEL rule with `self` bound to `value`.
pub fn eval_rule(expression: &str, value: &Value) -> Result<bool, String> {
    let program =
        cel::Program::compile(expression).map_err(|err| format!("compilation failed: {err}"))?;
    let self_value = cel::to_value(value).map_err(|err| format!("converting self: {err}"))?;
    // The interpreter is third-party code fed client input: contain any panic as an error.
    let res = catch_unwind(AssertUnwindSafe(|| {
        let mut context = cel::Context::default();
        context.add_variable_from_value("self", self_value);
        program.execute(&context)
    }))
    .map_err(|_| "the CEL evaluator failed".to_owned())?;
    match res {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("rule did not evaluate to a bool: {other:?}")),
        Err(err) => Err(format!("evaluation error: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["clusterAgent"], "properties": {
            "planeID": {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
            "clusterAgent": {"type": "object", "properties": {"clientCA": {"type": "object",
                "x-kubernetes-validations": [{"rule": "has(self.secretRef) != has(self.value)", "message": "exactly one of secretRef or value must be set"}],
                "properties": {"value": {"type": "string", "nullable": true}, "secretRef": {"type": "object", "nullable": true, "properties": {"name": {"type": "string"}}}}}}}
        }}}, "required": ["spec"]})
    }

    /// Each kind of violation is reported with the field and the server's wording.
    #[test]
    fn violations_are_reported_like_the_api_server() {
        let cases = [
            (
                json!({"planeID": "Bad", "clusterAgent": {"clientCA": {"value": "x"}}}),
                "spec.planeID: Invalid value: \"Bad\": spec.planeID in body should match",
            ),
            (
                json!({"planeID": "a".repeat(64), "clusterAgent": {"clientCA": {"value": "x"}}}),
                "spec.planeID: Too long",
            ),
            (
                json!({"clusterAgent": {"clientCA": {}}}),
                "spec.clusterAgent.clientCA: Invalid value: \"object\": exactly one of secretRef or value must be set",
            ),
            (
                json!({"clusterAgent": {"clientCA": {"value": "x", "secretRef": {"name": "s"}}}}),
                "exactly one of",
            ),
            (
                json!({"mode": "c", "clusterAgent": {"clientCA": {"value": "x"}}}),
                "spec.mode: Unsupported value: \"c\"",
            ),
            (
                json!({"planeID": 5, "clusterAgent": {"clientCA": {"value": "x"}}}),
                "spec.planeID: Invalid value: 5: spec.planeID in body must be of type string",
            ),
            (json!({}), "spec.clusterAgent: Required value"),
        ];
        for (spec, expected) in cases {
            let mut object =
                json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"}, "spec": spec});
            let causes = admit(&schema(), &mut object);
            let text = causes
                .iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect::<Vec<_>>()
                .join("; ");
            assert!(text.contains(expected), "expected {expected:?} in {text:?}");
        }
    }

    /// A valid object passes, gets its defaults, and loses unknown fields.
    #[test]
    fn valid_object_is_defaulted_and_pruned() {
        let mut object = json!({"metadata": {"name": "n"}, "spec": {"planeID": "ok", "unknown": 1, "clusterAgent": {"clientCA": {"value": "x"}}}});
        assert!(admit(&schema(), &mut object).is_empty());
        assert_eq!(object["spec"]["mode"], "a");
        assert!(object["spec"].get("unknown").is_none());
    }
}
