//! Bindings: named JSON values substituted into scenario strings as `$(name)` or `$(name.field)`.
//!
//! A string that is exactly one `$(name)` becomes the bound value with its type (a number stays
//! a number, a list stays a list); otherwise the value is interpolated as text.
//! `$(` followed by something that is not a name (such as the shell's `$(echo "$X" | sed ..)`)
//! is left alone, and `$$(` writes a literal `$(`.

use std::collections::BTreeMap;

use serde_json::Value;

/// Why a substitution failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    /// `$(name)` names no binding.
    #[error("unknown binding `$({name})`; known: {known}")]
    Unknown {
        /// The name as written.
        name: String,
        /// The bindings in scope, comma-separated.
        known: String,
    },
    /// `$(name.field)` where the value has no such field.
    #[error("binding `$({path})` has no field `{field}`")]
    NoField {
        /// The full path as written.
        path: String,
        /// The missing segment.
        field: String,
    },
}

/// The bindings in scope: scenario → step → outputs of earlier operations.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    values: BTreeMap<String, Value>,
}

/// Whether `text` is a binding reference body (`name` or `name.field.0`).
fn is_reference(text: &str) -> bool {
    let mut segments = text.split('.');
    let first = segments.next().unwrap_or_default();
    let mut chars = first.chars();
    let starts_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    starts_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && segments.all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// Every `$(name)` reference in `text` (names only, without fields), for lint.
pub fn references(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("$(") {
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            rest = &rest[pos + 2..];
            continue;
        }
        let after = &rest[pos + 2..];
        match after.find(')') {
            Some(end) if is_reference(&after[..end]) => {
                let name = after[..end].split('.').next().unwrap_or_default();
                out.push(name.to_string());
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

impl Bindings {
    /// Empty bindings.
    pub fn new() -> Bindings {
        Bindings::default()
    }

    /// Binds `name` to `value`, replacing any previous value.
    pub fn set(&mut self, name: impl Into<String>, value: Value) {
        self.values.insert(name.into(), value);
    }

    /// The value bound to `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Every binding (for reports).
    pub fn all(&self) -> &BTreeMap<String, Value> {
        &self.values
    }

    fn lookup(&self, path: &str) -> Result<&Value, BindingError> {
        let mut segments = path.split('.');
        let name = segments.next().unwrap_or_default();
        let mut value = self.values.get(name).ok_or_else(|| BindingError::Unknown {
            name: name.to_string(),
            known: self.values.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        for field in segments {
            let next = match value {
                Value::Object(map) => map.get(field),
                Value::Array(items) => field.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            value = next.ok_or_else(|| BindingError::NoField {
                path: path.to_string(),
                field: field.to_string(),
            })?;
        }
        Ok(value)
    }

    /// Substitutes references in a string, keeping the type when the string is one reference.
    pub fn substitute_str(&self, text: &str) -> Result<Value, BindingError> {
        if let Some(body) = text.strip_prefix("$(").and_then(|t| t.strip_suffix(')'))
            && is_reference(body)
        {
            return Ok(self.lookup(body)?.clone());
        }
        Ok(Value::String(self.interpolate(text)?))
    }

    /// Substitutes references in a string, always producing text.
    pub fn interpolate(&self, text: &str) -> Result<String, BindingError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix("$$(") {
                out.push_str("$(");
                rest = after;
                continue;
            }
            if let Some(after) = tail.strip_prefix("$(")
                && let Some(end) = after.find(')')
                && is_reference(&after[..end])
            {
                match self.lookup(&after[..end])? {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
                rest = &after[end + 1..];
                continue;
            }
            out.push('$');
            rest = &tail[1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Substitutes references in every string of a JSON value (keys included).
    pub fn substitute(&self, value: &Value) -> Result<Value, BindingError> {
        Ok(match value {
            Value::String(s) => self.substitute_str(s)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.substitute(v))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (key, v) in map {
                    out.insert(self.interpolate(key)?, self.substitute(v)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bindings() -> Bindings {
        let mut bindings = Bindings::new();
        bindings.set("namespace", json!("e2e-x"));
        bindings.set("agents", json!(1000));
        bindings.set("swarm", json!({"planes": [{"planeID": "p-0"}]}));
        bindings
    }

    /// A whole-string reference keeps the bound type; an embedded one becomes text.
    #[test]
    fn keeps_type_for_whole_string_references() {
        let bindings = bindings();
        assert_eq!(bindings.substitute_str("$(agents)").unwrap(), json!(1000));
        assert_eq!(
            bindings.substitute_str("n=$(agents)").unwrap(),
            json!("n=1000")
        );
        assert_eq!(
            bindings
                .substitute_str("$(swarm.planes.0.planeID)")
                .unwrap(),
            json!("p-0")
        );
    }

    /// Shell command substitution with spaces and `$$(` escapes are not bindings.
    #[test]
    fn leaves_shell_substitutions_alone() {
        let bindings = bindings();
        let script = r#"$(echo "$BP_CA_CERT" | sed 's/^/    /') $$(date) $HOME ns=$(namespace)"#;
        assert_eq!(
            bindings.interpolate(script).unwrap(),
            r#"$(echo "$BP_CA_CERT" | sed 's/^/    /') $(date) $HOME ns=e2e-x"#
        );
        assert_eq!(references(script), vec!["namespace".to_string()]);
    }

    /// Unknown names and fields are errors that list what is known.
    #[test]
    fn reports_unknown_bindings_and_fields() {
        let bindings = bindings();
        let err = bindings.interpolate("$(namspace)").unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
        assert!(matches!(
            bindings.substitute_str("$(swarm.nope)"),
            Err(BindingError::NoField { .. })
        ));
    }

    /// Keys and nested values of objects are substituted.
    #[test]
    fn substitutes_inside_objects() {
        let bindings = bindings();
        let out = bindings
            .substitute(&json!({"metadata": {"namespace": "$(namespace)"}, "n": ["$(agents)"]}))
            .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"namespace": "e2e-x"}, "n": [1000]})
        );
    }
}
