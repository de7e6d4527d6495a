//! Label and field selectors (`labelSelector`, `fieldSelector` query parameters).

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_set(text: &str) -> Result<Vec<String>, ApiError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: set {text:?} needs parentheses"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f,g in (x,y),h notin (z)`.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, set)) = term.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_owned(), parse_set(set)?)
            } else if let Some((key, set)) = term.split_once(" in ") {
                Requirement::In(key.trim().to_owned(), parse_set(set)?)
            } else if term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Requirement::Exists(term.to_owned())
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {term:?}"
                )));
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Whether an object's labels satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, set) => label(k).is_some_and(|v| set.iter().any(|s| s == v)),
            Requirement::NotIn(k, set) => label(k).is_none_or(|v| !set.iter().any(|s| s == v)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// A parsed field selector: `metadata.name`, `metadata.namespace` and the fields the real server
/// indexes for the resource, with `=`, `==`, `!=`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The fields a resource can be selected by besides `metadata.name` and `metadata.namespace`.
fn selectable(group: &str, plural: &str) -> &'static [&'static str] {
    match (group, plural) {
        ("", "secrets") => &["type"],
        ("", "namespaces") => &["status.phase"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        _ => &[],
    }
}

impl FieldSelector {
    /// Parses a field selector, rejecting fields the server does not index for the resource.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        Self::parse_for(text, "", "")
    }

    /// Parses a field selector for one resource (`group`, `plural`).
    pub fn parse_for(text: &str, group: &str, plural: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in split_terms(text) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {term:?}; can't understand it"
                )));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace")
                && !selectable(group, plural).contains(&field)
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    /// Whether an object satisfies every term.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = if field == "source" {
                object["source"]["component"].clone()
            } else {
                field
                    .split('.')
                    .fold(object, |current, part| &current[part])
                    .clone()
            };
            let actual = match actual {
                Value::String(s) => s,
                // The real server selects on the Go field, whose zero value a missing one has.
                Value::Null if field == "spec.unschedulable" => "false".to_owned(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every selector form matches as the API server's does.
    #[test]
    fn label_selector_forms() {
        let object = json!({"metadata": {"labels": {"app": "agent", "tier": "build"}}});
        let cases = [
            ("app=agent", true),
            ("app==agent", true),
            ("app!=agent", false),
            ("app=gateway", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("tier in (build, run)", true),
            ("tier notin (build)", false),
            ("app=agent,tier in (run)", false),
            ("", true),
        ];
        for (text, expected) in cases {
            let selector = LabelSelector::parse(text).expect(text);
            assert_eq!(selector.matches(&object), expected, "{text}");
        }
        assert!(LabelSelector::parse("a in b").is_err());
    }

    /// Field selectors support name and namespace and reject other fields with 400.
    #[test]
    fn field_selector_forms() {
        let object = json!({"metadata": {"name": "x", "namespace": "ns"}});
        assert!(
            FieldSelector::parse("metadata.name=x")
                .expect("valid")
                .matches(&object)
        );
        assert!(
            !FieldSelector::parse("metadata.namespace!=ns")
                .expect("valid")
                .matches(&object)
        );
        assert_eq!(
            FieldSelector::parse("spec.nodeName=a")
                .expect_err("unsupported")
                .code,
            400
        );
        let event = json!({"involvedObject": {"kind": "BuildPlane", "name": "bp"}});
        let selector = FieldSelector::parse_for(
            "involvedObject.kind=BuildPlane,involvedObject.name=bp",
            "",
            "events",
        )
        .expect("indexed");
        assert!(selector.matches(&event));
    }
}
