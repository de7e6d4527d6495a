//! Partial object matching: the expected value is a subset of the actual one.
//!
//! Maps match key by key (extra actual keys are fine). Lists of maps match by key when the
//! expected elements carry one (`type` for conditions, else `name`), otherwise each expected
//! element must match some distinct actual element, in any order (KUTTL's by-position rule
//! is the complaint this avoids). Strings `(op value)` compare instead of requiring equality.

use std::fmt::Write as _;

use serde_json::Value;

/// Keys that identify list elements, in order of preference.
const LIST_KEYS: [&str; 3] = ["type", "name", "key"];

/// One mismatch: where, what was expected, what was found.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Path such as `status.conditions[type=Ready].status`.
    pub path: String,
    /// What the scenario expected.
    pub expected: String,
    /// What the object had (`<missing>` when absent).
    pub actual: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: expected {}, got {}",
            self.path, self.expected, self.actual
        )
    }
}

/// Compares `actual` with `expected`; empty when `actual` matches.
pub fn mismatches(expected: &Value, actual: &Value) -> Vec<Mismatch> {
    let mut out = Vec::new();
    compare("", expected, Some(actual), &mut out);
    out
}

/// Whether `actual` matches `expected`.
pub fn matches(expected: &Value, actual: &Value) -> bool {
    mismatches(expected, actual).is_empty()
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 120 {
        format!("{}…", &text[..crate::duration::char_floor(&text, 120)])
    } else {
        text
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// An operator string `(op value)`.
enum Operator<'a> {
    Absent,
    Cmp(&'a str, &'a str),
    Exists,
    Regex(&'a str),
}

fn operator(text: &str) -> Option<Operator<'_>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?.trim();
    match inner {
        "exists" => return Some(Operator::Exists),
        "absent" => return Some(Operator::Absent),
        _ => {}
    }
    if let Some(pattern) = inner.strip_prefix("~ ") {
        return Some(Operator::Regex(pattern.trim()));
    }
    for op in [">=", "<=", "!=", "==", ">", "<"] {
        if let Some(rest) = inner.strip_prefix(op)
            && rest.starts_with(' ')
        {
            return Some(Operator::Cmp(op, rest.trim()));
        }
    }
    None
}

/// Evaluates a comparison such as `>= 3` against a number; also used by metric waits.
pub fn compare_number(op: &str, actual: f64, wanted: f64) -> bool {
    match op {
        ">=" => actual >= wanted,
        "<=" => actual <= wanted,
        ">" => actual > wanted,
        "<" => actual < wanted,
        "==" => (actual - wanted).abs() < f64::EPSILON,
        "!=" => (actual - wanted).abs() >= f64::EPSILON,
        _ => false,
    }
}

/// Parses `">= 1000"` into (`>=`, 1000).
pub fn parse_comparison(text: &str) -> Option<(&'static str, f64)> {
    let text = text.trim();
    for op in [">=", "<=", "!=", "==", ">", "<"] {
        if let Some(rest) = text.strip_prefix(op) {
            return rest.trim().parse().ok().map(|n| (op, n));
        }
    }
    text.parse().ok().map(|n| ("==", n))
}

fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::Bool(_) | Value::Number(_) | Value::String(_))
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn compare(path: &str, expected: &Value, actual: Option<&Value>, out: &mut Vec<Mismatch>) {
    let missing = || "<missing>".to_string();
    if let Value::String(text) = expected
        && let Some(op) = operator(text)
    {
        let ok = match (&op, actual) {
            (Operator::Absent, actual) => actual.is_none_or(Value::is_null),
            (Operator::Exists, actual) => actual.is_some_and(|v| !v.is_null()),
            (_, None) => false,
            (Operator::Regex(pattern), Some(actual)) => {
                regex::Regex::new(pattern).is_ok_and(|re| re.is_match(&scalar_text(actual)))
            }
            (Operator::Cmp(op, wanted), Some(actual)) => {
                match (as_number(actual), wanted.parse::<f64>()) {
                    (Some(a), Ok(w)) => compare_number(op, a, w),
                    _ => match *op {
                        "!=" => scalar_text(actual) != *wanted,
                        "==" => scalar_text(actual) == *wanted,
                        _ => false,
                    },
                }
            }
        };
        if !ok {
            out.push(Mismatch {
                path: path.to_string(),
                expected: text.clone(),
                actual: actual.map(short).unwrap_or_else(missing),
            });
        }
        return;
    }
    let Some(actual) = actual else {
        out.push(Mismatch {
            path: path.to_string(),
            expected: short(expected),
            actual: missing(),
        });
        return;
    };
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, want_value) in want {
                compare(&join(path, key), want_value, have.get(key), out);
            }
        }
        (Value::Array(want), Value::Array(have)) => compare_lists(path, want, have, out),
        (Value::Number(a), Value::Number(b)) => {
            if a.as_f64() != b.as_f64() {
                out.push(Mismatch {
                    path: path.to_string(),
                    expected: short(expected),
                    actual: short(actual),
                });
            }
        }
        // Kubernetes often writes booleans and numbers as strings (condition status, quantities).
        (want, have)
            if is_scalar(want) && is_scalar(have) && scalar_text(want) == scalar_text(have) => {}
        _ => out.push(Mismatch {
            path: path.to_string(),
            expected: short(expected),
            actual: short(actual),
        }),
    }
}

fn list_key(items: &[Value]) -> Option<&'static str> {
    LIST_KEYS.into_iter().find(|key| {
        !items.is_empty()
            && items.iter().all(|item| {
                item.get(key)
                    .is_some_and(|v| v.is_string() && operator(v.as_str().unwrap_or("")).is_none())
            })
    })
}

fn compare_lists(path: &str, want: &[Value], have: &[Value], out: &mut Vec<Mismatch>) {
    if let Some(key) = list_key(want) {
        for item in want {
            let id = &item[key];
            let element_path = format!("{path}[{key}={}]", scalar_text(id));
            let found = have.iter().find(|h| h.get(key) == Some(id));
            compare(&element_path, item, found, out);
        }
        return;
    }
    // Without keys: greedy assignment of each expected element to an unused matching element.
    let mut used = vec![false; have.len()];
    for (i, item) in want.iter().enumerate() {
        let position = have
            .iter()
            .enumerate()
            .position(|(j, h)| !used[j] && matches(item, h));
        match position {
            Some(j) => used[j] = true,
            None => {
                // Report against the first unused element to give a useful diff.
                let candidate = have
                    .iter()
                    .enumerate()
                    .find(|(j, _)| !used[*j])
                    .map(|(_, h)| h);
                let element_path = format!("{path}[{i}]");
                match candidate {
                    Some(candidate) => compare(&element_path, item, Some(candidate), out),
                    None => out.push(Mismatch {
                        path: element_path,
                        expected: short(item),
                        actual: format!("no element left (list has {})", have.len()),
                    }),
                }
            }
        }
    }
}

/// Reduces `actual` to the shape of `expected` (same keys, keyed list elements), so the diff
/// between expected and actual shows only what the scenario cares about.
pub fn project(expected: &Value, actual: &Value) -> Value {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            let mut out = serde_json::Map::new();
            for (key, want_value) in want {
                if let Some(have_value) = have.get(key) {
                    out.insert(key.clone(), project(want_value, have_value));
                }
            }
            Value::Object(out)
        }
        (Value::Array(want), Value::Array(have)) => {
            if let Some(key) = list_key(want) {
                Value::Array(
                    want.iter()
                        .filter_map(|item| {
                            have.iter()
                                .find(|h| h.get(key) == item.get(key))
                                .map(|h| project(item, h))
                        })
                        .collect(),
                )
            } else {
                Value::Array(
                    have.iter()
                        .zip(want.iter().chain(std::iter::repeat(&Value::Null)))
                        .map(|(h, w)| project(w, h))
                        .collect(),
                )
            }
        }
        (Value::Null, have) => have.clone(),
        (_, have) => have.clone(),
    }
}

/// A unified diff (expected → actual, both projected to the expected shape) in YAML.
pub fn diff(expected: &Value, actual: &Value) -> String {
    let want = serde_yaml::to_string(expected).unwrap_or_default();
    let have = serde_yaml::to_string(&project(expected, actual)).unwrap_or_default();
    let diff = similar::TextDiff::from_lines(&want, &have);
    let mut out = String::new();
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        let _ = write!(out, "{sign} {change}");
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn status(conditions: Value) -> Value {
        json!({"metadata": {"name": "bp", "uid": "1"}, "status": {"conditions": conditions, "observedGeneration": 2}})
    }

    /// Extra keys in the actual object do not matter; a different value does.
    #[test]
    fn matches_maps_as_subsets() {
        let actual = status(json!([]));
        assert!(matches(&json!({"metadata": {"name": "bp"}}), &actual));
        let found = mismatches(&json!({"metadata": {"name": "other"}}), &actual);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "metadata.name");
    }

    /// Conditions are found by `type`, whatever their position (KUTTL's #76).
    #[test]
    fn matches_conditions_by_type_not_position() {
        let actual = status(json!([
            {"type": "ClientCAResolved", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "NoAgentsConnected"},
        ]));
        assert!(matches(
            &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            &actual
        ));
        let found = mismatches(
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            &actual,
        );
        assert_eq!(found[0].path, "status.conditions[type=Ready].status");
        assert_eq!(found[0].actual, "\"False\"");
        let found = mismatches(
            &json!({"status": {"conditions": [{"type": "AgentConnected"}]}}),
            &actual,
        );
        assert_eq!(found[0].actual, "<missing>");
    }

    /// Lists without keys match element-wise in any order, each actual element used once.
    #[test]
    fn matches_unkeyed_lists_in_any_order() {
        let actual = json!({"args": ["b", "a", "c"]});
        assert!(matches(&json!({"args": ["a", "b"]}), &actual));
        assert!(!matches(&json!({"args": ["a", "a"]}), &actual));
    }

    /// Operators compare numbers, regexes, presence and absence.
    #[test]
    fn evaluates_operators() {
        let actual = json!({"n": 5, "s": "agent-7", "text": "3"});
        assert!(matches(
            &json!({"n": "(>= 5)", "s": "(~ ^agent-[0-9]+$)", "text": "(> 2)", "x": "(absent)"}),
            &actual
        ));
        assert!(!matches(&json!({"n": "(< 5)"}), &actual));
        assert!(!matches(&json!({"x": "(exists)"}), &actual));
        assert!(!matches(&json!({"n": "(absent)"}), &actual));
    }

    /// Booleans and numbers match their string forms (condition status, quantities).
    #[test]
    fn matches_scalars_across_string_forms() {
        assert!(matches(
            &json!({"connected": "true"}),
            &json!({"connected": true})
        ));
        assert!(matches(&json!({"n": 3}), &json!({"n": "3"})));
        assert!(!matches(
            &json!({"connected": "false"}),
            &json!({"connected": true})
        ));
    }

    /// The diff shows only the fields the scenario named, with the wrong value marked.
    #[test]
    fn diff_shows_projected_fields() {
        let actual = status(json!([{"type": "Ready", "status": "False", "message": "m"}]));
        let expected = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let text = diff(&expected, &actual);
        assert!(
            text.contains("-     status: 'True'") || text.contains("-   status: 'True'"),
            "{text}"
        );
        assert!(text.contains("False"), "{text}");
        assert!(!text.contains("observedGeneration"), "{text}");
    }

    /// Comparisons parse with or without an operator.
    #[test]
    fn parses_comparisons() {
        assert_eq!(parse_comparison(">= 1000"), Some((">=", 1000.0)));
        assert_eq!(parse_comparison("0"), Some(("==", 0.0)));
        assert_eq!(parse_comparison("about 3"), None);
    }
}
