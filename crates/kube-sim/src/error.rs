//! API errors rendered as `metav1.Status` objects, as the real API server does.

use serde_json::{Value, json};
use thiserror::Error;

/// The `reason` of a cause, from the wording of its message as the real server's field errors
/// begin (`Required value`, `Unsupported value: ...`, ...).
fn cause_reason(message: &str) -> &'static str {
    [
        ("Required value", "FieldValueRequired"),
        ("Unsupported value", "FieldValueNotSupported"),
        ("Forbidden", "FieldValueForbidden"),
        ("Duplicate value", "FieldValueDuplicate"),
        ("Too long", "FieldValueTooLong"),
        ("Too many", "FieldValueTooMany"),
    ]
    .iter()
    .find(|(prefix, _)| message.starts_with(prefix))
    .map_or("FieldValueInvalid", |(_, reason)| reason)
}

/// An error answered to a client as a `Status` with a code and reason.
#[derive(Debug, Clone, Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` of the Status, if any.
    pub details: Option<Box<Value>>,
    /// `Retry-After` seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with no details.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// 404 for an object.
    pub fn not_found(qualified_plural: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{qualified_plural} \"{name}\" not found"),
        )
        .with_details(name, qualified_plural)
    }

    /// 409 AlreadyExists.
    pub fn already_exists(qualified_plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{qualified_plural} \"{name}\" already exists"),
        )
        .with_details(name, qualified_plural)
    }

    /// 409 Conflict on a stale resourceVersion.
    pub fn conflict(qualified_plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {qualified_plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        )
        .with_details(name, qualified_plural)
    }

    /// 409 Conflict for a failed delete precondition.
    pub fn precondition(qualified_plural: &str, name: &str, message: String) -> Self {
        Self::new(409, "Conflict", message).with_details(name, qualified_plural)
    }

    /// 409 Conflict of a server-side apply, worded like the real server.
    pub fn apply_conflicts(conflicts: &[crate::managed::Conflict]) -> Self {
        // As the real server prints a manager (`printManager`): an applier by name, an updater
        // with the version it wrote, either with its subresource.
        let owner_of = |conflict: &crate::managed::Conflict| {
            let mut owner = format!("{:?}", conflict.manager);
            if !conflict.subresource.is_empty() {
                owner.push_str(&format!(" with subresource {:?}", conflict.subresource));
            }
            if conflict.operation == "Update" {
                owner.push_str(&format!(" using {}", conflict.api_version));
            }
            owner
        };
        let mut by_manager: Vec<(String, Vec<String>)> = Vec::new();
        for conflict in conflicts {
            let owner = owner_of(conflict);
            match by_manager.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, fields)) => fields.push(conflict.field.clone()),
                None => by_manager.push((owner, vec![conflict.field.clone()])),
            }
        }
        // The real server prints the managers sorted.
        by_manager.sort_by(|a, b| a.0.cmp(&b.0));
        let count = conflicts.len();
        let message = match by_manager.as_slice() {
            [(owner, fields)] if fields.len() == 1 => {
                format!(
                    "Apply failed with 1 conflict: conflict with {owner}: {}",
                    fields[0]
                )
            }
            _ => {
                let parts: Vec<String> = by_manager
                    .iter()
                    .map(|(owner, fields)| {
                        format!("conflicts with {owner}:\n- {}", fields.join("\n- "))
                    })
                    .collect();
                format!("Apply failed with {count} conflicts: {}", parts.join("\n"))
            }
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {}", owner_of(c)), "field": c.field}))
            .collect();
        Self {
            code: 409,
            reason: "Conflict",
            message,
            details: Some(Box::new(json!({"causes": causes}))),
            retry_after: None,
        }
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 500 InternalError.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// 422 Invalid with causes, as the real server words it.
    pub fn invalid(qualified_kind: &str, name: &str, causes: &[(String, String)]) -> Self {
        let summary = causes
            .iter()
            .map(|(field, message)| format!("{field}: {message}"))
            .collect::<Vec<_>>();
        let summary = if summary.len() == 1 {
            summary[0].clone()
        } else {
            format!("[{}]", summary.join(", "))
        };
        let (kind, group) = qualified_kind
            .split_once('.')
            .unwrap_or((qualified_kind, ""));
        Self {
            code: 422,
            reason: "Invalid",
            message: format!("{qualified_kind} \"{name}\" is invalid: {summary}"),
            details: Some(Box::new(json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes.iter().map(|(field, message)| json!({"reason": cause_reason(message), "message": message, "field": field})).collect::<Vec<_>>(),
            }))),
            retry_after: None,
        }
    }

    fn with_details(mut self, name: &str, qualified_plural: &str) -> Self {
        let (kind, group) = qualified_plural
            .split_once('.')
            .unwrap_or((qualified_plural, ""));
        self.details = Some(Box::new(
            json!({"name": name, "group": group, "kind": kind}),
        ));
        self
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = (**details).clone();
        }
        if let Some(seconds) = self.retry_after {
            status["details"]["retryAfterSeconds"] = json!(seconds);
        }
        status
    }
}
