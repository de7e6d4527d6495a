//! CRD schema enforcement: defaults, pruning of unknown fields, types, required, pattern,
//! lengths, bounds, enum, and `x-kubernetes-validations` CEL rules (with `oldSelf` transition
//! rules on updates and `messageExpression`), with the real server's messages.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::Value;

/// The outcome of admitting an object against a schema.
#[derive(Debug, Default)]
pub struct Admission {
    /// `(field, message)` validation failures (a 422 when not empty).
    pub causes: Vec<(String, String)>,
    /// Unknown fields that were pruned (`fieldValidation=Strict` rejects them).
    pub unknown_fields: Vec<String>,
}

/// Applies defaults and prunes unknown fields, then validates (`old` is the stored object, for
/// transition rules).
pub fn admit(schema: &Value, object: &mut Value, old: Option<&Value>) -> Admission {
    let mut admission = Admission::default();
    if let Some(properties) = schema["properties"].as_object() {
        if let Some(map) = object.as_object_mut() {
            for (name, property) in properties {
                if matches!(name.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                if let Some(value) = map.get_mut(name) {
                    normalise(property, value, name, &mut admission.unknown_fields);
                } else if let Some(default) = property.get("default") {
                    map.insert(name.clone(), default.clone());
                }
            }
            if schema["x-kubernetes-preserve-unknown-fields"].as_bool() != Some(true) {
                let unknown: Vec<String> = map
                    .keys()
                    .filter(|key| {
                        !matches!(key.as_str(), "metadata" | "apiVersion" | "kind")
                            && !properties.contains_key(*key)
                    })
                    .cloned()
                    .collect();
                for key in unknown {
                    map.remove(&key);
                    admission.unknown_fields.push(key);
                }
            }
            for (name, property) in properties {
                if matches!(name.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                if let Some(value) = map.get(name) {
                    let old_value = old.and_then(|o| o.get(name));
                    check(property, value, old_value, name, &mut admission.causes);
                }
            }
        }
        for required in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if object.get(required).is_none() {
                admission
                    .causes
                    .push((required.to_owned(), "Required value".to_owned()));
            }
        }
    }
    check_rules(schema, object, old, "<nil>", &mut admission.causes);
    admission
}

/// Applies defaults and prunes unknown fields below one node.
fn normalise(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    match map.get_mut(name) {
                        Some(child) => {
                            normalise(property, child, &format!("{path}.{name}"), unknown)
                        }
                        None => {
                            if let Some(default) = property.get("default") {
                                map.insert(name.clone(), default.clone());
                            }
                        }
                    }
                }
                if !schema["additionalProperties"].is_object() {
                    let extra: Vec<String> = map
                        .keys()
                        .filter(|key| !properties.contains_key(*key))
                        .cloned()
                        .collect();
                    for key in extra {
                        map.remove(&key);
                        unknown.push(format!("{path}.{key}"));
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (name, child) in map.iter_mut() {
                    normalise(additional, child, &format!("{path}.{name}"), unknown);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    normalise(item_schema, item, &format!("{path}[{i}]"), unknown);
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
fn check(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<(String, String)>,
) {
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
        let int_or_string = schema["x-kubernetes-int-or-string"].as_bool() == Some(true)
            && matches!(actual, "integer" | "string");
        if !ok && !int_or_string {
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
    if let Some(number) = value.as_f64() {
        let exclusive_max = schema["exclusiveMaximum"].as_bool() == Some(true);
        if let Some(max) = schema["maximum"].as_f64()
            && (number > max || (exclusive_max && number >= max))
        {
            let relation = if exclusive_max {
                "less than"
            } else {
                "less than or equal to"
            };
            causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: {value}: {path} in body should be {relation} {}",
                    schema["maximum"]
                ),
            ));
        }
        let exclusive_min = schema["exclusiveMinimum"].as_bool() == Some(true);
        if let Some(min) = schema["minimum"].as_f64()
            && (number < min || (exclusive_min && number <= min))
        {
            let relation = if exclusive_min {
                "greater than"
            } else {
                "greater than or equal to"
            };
            causes.push((
                path.to_owned(),
                format!(
                    "Invalid value: {value}: {path} in body should be {relation} {}",
                    schema["minimum"]
                ),
            ));
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
                        let old_child = old.and_then(|o| o.get(name));
                        check(
                            property,
                            child,
                            old_child,
                            &format!("{path}.{name}"),
                            causes,
                        );
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (name, child) in map {
                    let old_child = old.and_then(|o| o.get(name));
                    check(
                        additional,
                        child,
                        old_child,
                        &format!("{path}.{name}"),
                        causes,
                    );
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
            if let Some(max) = schema["maxProperties"].as_u64()
                && map.len() as u64 > max
            {
                causes.push((
                    path.to_owned(),
                    format!("Too many: {}: must have at most {max} items", map.len()),
                ));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                causes.push((
                    path.to_owned(),
                    format!("Too many: {}: must have at most {max} items", items.len()),
                ));
            }
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                causes.push((
                    path.to_owned(),
                    format!(
                        "Invalid value: {}: {path} in body should have at least {min} items",
                        items.len()
                    ),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, None, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
    check_rules(schema, value, old, path, causes);
}

/// Evaluates the `x-kubernetes-validations` of one node; transition rules (`oldSelf`) only when
/// an old value exists, as on the real server.
fn check_rules(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<(String, String)>,
) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(expression) = rule["rule"].as_str() else {
            continue;
        };
        let transition = expression.contains("oldSelf");
        if transition && old.is_none() {
            continue;
        }
        let field = match rule["fieldPath"].as_str() {
            Some(extra) if path == "<nil>" => extra.trim_start_matches('.').to_owned(),
            Some(extra) => format!("{path}{extra}"),
            None => path.to_owned(),
        };
        match eval(expression, value, old) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => {
                let message = rule["messageExpression"]
                    .as_str()
                    .and_then(|e| match eval(e, value, old) {
                        Ok(cel::Value::String(s)) => Some(s.to_string()),
                        _ => None,
                    })
                    .or_else(|| rule["message"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("failed rule: {expression}"));
                let reason = rule["reason"].as_str().unwrap_or("FieldValueInvalid");
                let text = match reason {
                    "FieldValueForbidden" => format!("Forbidden: {message}"),
                    "FieldValueRequired" => format!("Required value: {message}"),
                    "FieldValueDuplicate" => format!("Duplicate value: {message}"),
                    // Kubernetes 1.37 omits an object's value from CEL failures (earlier
                    // releases printed `Invalid value: "object": ...`) and quotes a scalar.
                    _ if value.is_object() => format!("Invalid value: {message}"),
                    _ => format!("Invalid value: {}: {message}", describe(value)),
                };
                causes.push((field, text));
            }
            Ok(other) => causes.push((
                field,
                format!(
                    "Invalid value: {}: rule {expression:?} did not evaluate to a bool: {other:?}",
                    describe(value)
                ),
            )),
            Err(err) => causes.push((
                field,
                format!(
                    "Invalid value: {}: rule {expression:?}: {err}",
                    describe(value)
                ),
            )),
        }
    }
}

/// Evaluates one CEL rule with `self` bound to `value` (the result must be a bool).
pub fn eval_rule(expression: &str, value: &Value) -> Result<bool, String> {
    match eval(expression, value, None)? {
        cel::Value::Bool(b) => Ok(b),
        other => Err(format!("rule did not evaluate to a bool: {other:?}")),
    }
}

/// Evaluates a CEL expression with `self` (and `oldSelf`) bound.
fn eval(expression: &str, value: &Value, old: Option<&Value>) -> Result<cel::Value, String> {
    let program =
        cel::Program::compile(expression).map_err(|err| format!("compilation failed: {err}"))?;
    let self_value = cel::to_value(value).map_err(|err| format!("converting self: {err}"))?;
    let old_value = match old {
        Some(old) => Some(cel::to_value(old).map_err(|err| format!("converting oldSelf: {err}"))?),
        None => None,
    };
    // The interpreter is third-party code fed client input: contain any panic as an error.
    let res = catch_unwind(AssertUnwindSafe(|| {
        let mut context = cel::Context::default();
        context.add_variable_from_value("self", self_value);
        if let Some(old_value) = old_value {
            context.add_variable_from_value("oldSelf", old_value);
        }
        program.execute(&context)
    }))
    .map_err(|_| "the CEL evaluator failed".to_owned())?;
    res.map_err(|err| format!("evaluation error: {err}"))
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
                "spec.clusterAgent.clientCA: Invalid value: exactly one of secretRef or value must be set",
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
            let causes = admit(&schema(), &mut object, None).causes;
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
        let admission = admit(&schema(), &mut object, None);
        assert!(admission.causes.is_empty());
        assert_eq!(admission.unknown_fields, vec!["spec.unknown".to_owned()]);
        assert_eq!(object["spec"]["mode"], "a");
        assert!(object["spec"].get("unknown").is_none());
    }

    /// Transition rules see the stored value on updates and are skipped on creation.
    #[test]
    fn transition_rules_use_the_old_object() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "planeID": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "planeID is immutable"}]}}}}});
        let mut created = json!({"spec": {"planeID": "a"}});
        assert!(admit(&schema, &mut created, None).causes.is_empty());
        let mut changed = json!({"spec": {"planeID": "b"}});
        let causes = admit(&schema, &mut changed, Some(&created)).causes;
        assert_eq!(
            causes,
            vec![(
                "spec.planeID".to_owned(),
                "Invalid value: \"b\": planeID is immutable".to_owned()
            )]
        );
    }
}
