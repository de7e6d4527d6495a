//! Validation of plane specs beyond what serde enforces, with messages naming the field.

use schemars::{Schema, SchemaGenerator, json_schema};
use thiserror::Error;

use crate::types::ValueFrom;

/// Maximum length of a planeID (a DNS label).
pub const PLANE_ID_MAX_LEN: usize = 63;
/// The planeID pattern, as in the CRD.
pub const PLANE_ID_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Why a spec is invalid; the message names the field as the API server would.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the offending field, for example `spec.planeID`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Checks a planeID: 1 to 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn validate_plane_id(field: &str, plane_id: &str) -> Result<(), ValidationError> {
    if plane_id.is_empty() {
        return Err(ValidationError::new(
            field,
            "Required value: planeID must not be empty",
        ));
    }
    if plane_id.len() > PLANE_ID_MAX_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "Too long: may not be more than {PLANE_ID_MAX_LEN} bytes (got {})",
                plane_id.len()
            ),
        ));
    }
    let bytes = plane_id.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = alnum(&bytes[0])
        && alnum(&bytes[bytes.len() - 1])
        && bytes.iter().all(|b| alnum(b) || *b == b'-');
    if !valid {
        return Err(ValidationError::new(
            field,
            format!("Invalid value: {plane_id:?}: should match '{PLANE_ID_PATTERN}'"),
        ));
    }
    Ok(())
}

/// Checks that exactly one of `secretRef` and `value` is set, and that the reference is complete.
pub(crate) fn validate_value_from(
    field: &str,
    value_from: &ValueFrom,
    namespaced: bool,
) -> Result<(), ValidationError> {
    match (&value_from.secret_ref, &value_from.value) {
        (Some(_), Some(_)) | (None, None) => Err(ValidationError::new(
            field,
            "Invalid value: exactly one of secretRef or value must be set",
        )),
        (None, Some(value)) if value.trim().is_empty() => Err(ValidationError::new(
            &format!("{field}.value"),
            "Required value: must not be empty",
        )),
        (Some(secret_ref), None) => {
            if secret_ref.name.is_empty() {
                return Err(ValidationError::new(
                    &format!("{field}.secretRef.name"),
                    "Required value",
                ));
            }
            if secret_ref.key.is_empty() {
                return Err(ValidationError::new(
                    &format!("{field}.secretRef.key"),
                    "Required value",
                ));
            }
            if !namespaced && secret_ref.namespace.as_deref().unwrap_or("").is_empty() {
                return Err(ValidationError::new(
                    &format!("{field}.secretRef.namespace"),
                    "Required value: a cluster-scoped plane must name the Secret's namespace",
                ));
            }
            Ok(())
        }
        (None, Some(_)) => Ok(()),
    }
}

/// Schema of the planeID field: string, max 63, DNS-label pattern.
pub(crate) fn plane_id_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": PLANE_ID_MAX_LEN,
        "pattern": PLANE_ID_PATTERN,
        "description": "Identifies the logical plane this CR connects to; must match the agent's planeID. Several CRs may share one planeID. When empty, the CR name is used."
    })
}

/// Schema of `metav1.Condition` lists, keyed by `type` as the API conventions ask.
pub(crate) fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "description": "Standard conditions: ClientCAResolved, AgentConnected, Ready.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "maxLength": 316},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "reason": {"type": "string", "maxLength": 1024},
                "message": {"type": "string", "maxLength": 32768}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rejected planeID names the field; every accepted one is a DNS label.
    #[test]
    fn plane_id_table() {
        let long = "a".repeat(64);
        let max = "a".repeat(63);
        let cases: &[(&str, Option<&str>)] = &[
            ("shared-builder", None),
            ("ci-cluster", None),
            ("us-west-2", None),
            ("a", None),
            (&max, None),
            ("", Some("Required value")),
            ("Prod", Some("should match")),
            ("UPPER", Some("should match")),
            ("-leading", Some("should match")),
            ("trailing-", Some("should match")),
            ("under_score", Some("should match")),
            ("dot.ted", Some("should match")),
            (&long, Some("Too long")),
        ];
        for (input, expected) in cases {
            let res = validate_plane_id("spec.planeID", input);
            match expected {
                None => assert!(res.is_ok(), "{input:?} should be valid, got {res:?}"),
                Some(fragment) => {
                    let err = res.expect_err(input);
                    assert_eq!(err.field, "spec.planeID");
                    assert!(err.to_string().starts_with("spec.planeID: "), "{err}");
                    assert!(err.message.contains(fragment), "{input:?}: {err}");
                }
            }
        }
    }
}
