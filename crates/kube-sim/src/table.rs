//! `meta.k8s.io/v1` Table output for `kubectl get`: the CRD's printer columns, or the columns the
//! real server prints for the built-in kinds.

use serde_json::{Value, json};

use crate::store::Resource;

/// A column: name, type, priority and how a cell is computed.
struct Column {
    name: String,
    kind: String,
    priority: i64,
    cell: Box<dyn Fn(&Value) -> Value>,
}

fn column(name: &str, kind: &str, cell: impl Fn(&Value) -> Value + 'static) -> Column {
    Column {
        name: name.to_owned(),
        kind: kind.to_owned(),
        priority: 0,
        cell: Box::new(cell),
    }
}

fn path_cell(path: &'static str) -> impl Fn(&Value) -> Value {
    move |object| json_path(object, path).unwrap_or(Value::Null)
}

fn count_cell(fields: &'static [&'static str]) -> impl Fn(&Value) -> Value {
    move |object| {
        let n: usize = fields
            .iter()
            .map(|f| match &object[*f] {
                Value::Object(m) => m.len(),
                Value::Array(a) => a.len(),
                _ => 0,
            })
            .sum();
        json!(n)
    }
}

fn name_cell(object: &Value) -> Value {
    object["metadata"]["name"].clone()
}

fn age_cell(object: &Value) -> Value {
    json!(age(object["metadata"]["creationTimestamp"].as_str()))
}

/// A CertificateSigningRequest's condition column: Denied, Approved or Pending, then Failed and
/// Issued (a certificate is set), as the real server's printer words it.
fn csr_condition(object: &Value) -> Value {
    let has = |kind: &str| {
        object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == kind)
    };
    let mut condition = if has("Denied") {
        "Denied".to_owned()
    } else if has("Approved") {
        "Approved".to_owned()
    } else {
        "Pending".to_owned()
    };
    if has("Failed") {
        condition.push_str(",Failed");
    }
    if object["status"]["certificate"]
        .as_str()
        .is_some_and(|c| !c.is_empty())
    {
        condition.push_str(",Issued");
    }
    json!(condition)
}

/// A duration in seconds as the real server's printers write one (`10m`, `1h`, `36h`, `2d`).
fn human_duration(seconds: i64) -> String {
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        let rest = seconds % 60;
        if rest == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{rest}s")
        }
    } else if hours < 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        let rest = minutes % 60;
        if rest == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{rest}m")
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        let rest = hours % 24;
        if rest == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{rest}h", hours / 24)
        }
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        let (years, days) = (hours / 24 / 365, (hours / 24) % 365);
        if days == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{days}d")
        }
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

/// The Event printer of kube-apiserver (`printEvent`), for core and `events.k8s.io` Events
/// alike (the latter converted to the core form first): last and first seen from the legacy
/// timestamps, else `eventTime`, else the series; the count from the series, else `count`, else 1.
fn event_columns(view: bool) -> Vec<Column> {
    let core = move |object: &Value| {
        if view {
            crate::events::to_core(object)
        } else {
            object.clone()
        }
    };
    let time = |value: &Value| value.as_str().filter(|t| !t.is_empty()).map(str::to_owned);
    let first_seen = move |o: &Value| {
        age(time(&o["firstTimestamp"])
            .or(time(&o["eventTime"]))
            .as_deref())
    };
    let last_seen = move |o: &Value| {
        if o["series"].is_object() {
            age(time(&o["series"]["lastObservedTime"]).as_deref())
        } else if let Some(last) = time(&o["lastTimestamp"]) {
            age(Some(&last))
        } else {
            first_seen(o)
        }
    };
    let text = |o: &Value, field: &str| o[field].as_str().unwrap_or("").to_owned();
    vec![
        column("Last Seen", "string", move |o| json!(last_seen(&core(o)))),
        column("Type", "string", move |o| json!(text(&core(o), "type"))),
        column("Reason", "string", move |o| json!(text(&core(o), "reason"))),
        column("Object", "string", move |o| {
            let involved = &core(o)["involvedObject"];
            let kind = text(involved, "kind").to_lowercase();
            let name = text(involved, "name");
            json!(if name.is_empty() {
                kind
            } else {
                format!("{kind}/{name}")
            })
        }),
        wide(column("Subobject", "string", move |o| {
            json!(text(&core(o)["involvedObject"], "fieldPath"))
        })),
        wide(column("Source", "string", move |o| {
            let o = core(o);
            let first = |a: String, b: String| if a.is_empty() { b } else { a };
            let component = first(
                text(&o["source"], "component"),
                text(&o, "reportingComponent"),
            );
            let instance = first(text(&o["source"], "host"), text(&o, "reportingInstance"));
            json!(if instance.is_empty() {
                component
            } else {
                format!("{component}, {instance}")
            })
        })),
        column("Message", "string", move |o| {
            json!(text(&core(o), "message").trim())
        }),
        wide(column("First Seen", "string", move |o| {
            json!(first_seen(&core(o)))
        })),
        wide(column("Count", "string", move |o| {
            let o = core(o);
            let count = match o["series"]["count"].as_i64() {
                Some(count) => count,
                None => o["count"].as_i64().filter(|c| *c != 0).unwrap_or(1),
            };
            json!(count)
        })),
        wide(column("Name", "string", |o| o["metadata"]["name"].clone())),
    ]
}

/// A column `kubectl get -o wide` adds.
fn wide(mut column: Column) -> Column {
    column.priority = 1;
    column
}

/// The names or images of a pod template's containers, comma-separated.
fn container_cells(object: &Value, field: &str) -> Value {
    let cells: Vec<&str> = object["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c[field].as_str().unwrap_or(""))
        .collect();
    json!(cells.join(","))
}

/// A Job's status column: from its True conditions, or Terminating, or Running.
fn job_status(object: &Value) -> Value {
    let has = |kind: &str| {
        object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
            .is_some_and(|c| c["status"] == "True")
    };
    let status = if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if object["metadata"]["deletionTimestamp"].is_string() {
        "Terminating"
    } else if has("Suspended") {
        "Suspended"
    } else if has("FailureTarget") {
        "FailureTarget"
    } else if has("SuccessCriteriaMet") {
        "SuccessCriteriaMet"
    } else {
        "Running"
    };
    json!(status)
}

fn builtin_columns(resource: &Resource) -> Vec<Column> {
    let name = || column("Name", "string", name_cell);
    let age_column = || column("Age", "string", age_cell);
    match (resource.group.as_str(), resource.plural.as_str()) {
        ("", "namespaces") => vec![
            name(),
            column("Status", "string", path_cell(".status.phase")),
            age_column(),
        ],
        ("", "secrets") => vec![
            name(),
            column("Type", "string", path_cell(".type")),
            column("Data", "string", count_cell(&["data"])),
            age_column(),
        ],
        ("", "configmaps") => vec![
            name(),
            column("Data", "string", count_cell(&["data", "binaryData"])),
            age_column(),
        ],
        ("", "serviceaccounts") => vec![
            name(),
            column("Secrets", "string", count_cell(&["secrets"])),
            age_column(),
        ],
        ("", "pods") => vec![
            name(),
            column("Ready", "string", |o| {
                let statuses = o["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let ready = statuses.iter().filter(|s| s["ready"] == true).count();
                json!(format!("{ready}/{total}"))
            }),
            column("Status", "string", |o| {
                json!(o["status"]["phase"].as_str().unwrap_or("Pending"))
            }),
            column("Restarts", "string", |o| {
                let restarts: i64 = o["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["restartCount"].as_i64())
                    .sum();
                json!(restarts.to_string())
            }),
            age_column(),
        ],
        ("certificates.k8s.io", "certificatesigningrequests") => vec![
            name(),
            age_column(),
            column("SignerName", "string", |o| {
                json!(o["spec"]["signerName"].as_str().unwrap_or("<none>"))
            }),
            column("Requestor", "string", path_cell(".spec.username")),
            column("RequestedDuration", "string", |o| {
                json!(
                    o["spec"]["expirationSeconds"]
                        .as_i64()
                        .map_or_else(|| "<none>".to_owned(), human_duration)
                )
            }),
            column("Condition", "string", csr_condition),
        ],
        ("batch", "jobs") => vec![
            name(),
            column("Status", "string", job_status),
            column("Completions", "string", |o| {
                let succeeded = o["status"]["succeeded"].as_i64().unwrap_or(0);
                let parallelism = o["spec"]["parallelism"].as_i64().unwrap_or(0);
                json!(match o["spec"]["completions"].as_i64() {
                    Some(completions) => format!("{succeeded}/{completions}"),
                    None if parallelism > 1 => format!("{succeeded}/1 of {parallelism}"),
                    None => format!("{succeeded}/1"),
                })
            }),
            column("Duration", "string", |o| {
                let time = |field: &str| {
                    o["status"][field]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                };
                json!(match (time("startTime"), time("completionTime")) {
                    (None, _) => String::new(),
                    (Some(start), None) => human_duration(
                        (chrono::Utc::now() - start.with_timezone(&chrono::Utc)).num_seconds()
                    ),
                    (Some(start), Some(end)) => human_duration((end - start).num_seconds()),
                })
            }),
            age_column(),
            wide(column("Containers", "string", |o| {
                container_cells(o, "name")
            })),
            wide(column("Images", "string", |o| container_cells(o, "image"))),
            wide(column("Selector", "string", |o| {
                json!(
                    crate::scale::selector_string(&o["spec"]["selector"])
                        .unwrap_or_else(|| "<none>".into())
                )
            })),
        ],
        ("coordination.k8s.io", "leases") => vec![
            name(),
            column("Holder", "string", path_cell(".spec.holderIdentity")),
            age_column(),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => vec![
            name(),
            column("Created At", "date", |o| {
                o["metadata"]["creationTimestamp"].clone()
            }),
        ],
        ("apiregistration.k8s.io", "apiservices") => vec![
            name(),
            column("Service", "string", |o| {
                json!(crate::apiservices::service_and_availability(o).0)
            }),
            column("Available", "string", |o| {
                json!(crate::apiservices::service_and_availability(o).1)
            }),
            age_column(),
        ],
        ("", "componentstatuses") => {
            let healthy = |o: &Value| -> Value {
                o["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Healthy")
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            vec![
                name(),
                column("Status", "string", move |o| {
                    let condition = healthy(o);
                    json!(match condition["status"].as_str() {
                        None => "Unknown",
                        Some("True") => "Healthy",
                        Some(_) => "Unhealthy",
                    })
                }),
                column("Message", "string", move |o| {
                    json!(healthy(o)["message"].as_str().unwrap_or(""))
                }),
                column("Error", "string", move |o| {
                    json!(healthy(o)["error"].as_str().unwrap_or(""))
                }),
            ]
        }
        ("", "events") => event_columns(false),
        ("events.k8s.io", "events") => event_columns(true),
        _ => vec![name(), age_column()],
    }
}

fn custom_columns(resource: &Resource) -> Vec<Column> {
    let mut columns = vec![column("Name", "string", name_cell)];
    if resource.printer_columns.is_empty() {
        columns.push(column("Age", "date", age_cell));
        return columns;
    }
    for printer in &resource.printer_columns {
        let name = printer["name"].as_str().unwrap_or("");
        let kind = printer["type"].as_str().unwrap_or("string");
        let path = printer["jsonPath"].as_str().unwrap_or("").to_owned();
        let is_date = kind == "date";
        let mut col = column(name, kind, move |object| {
            let value = json_path(object, &path).unwrap_or(Value::Null);
            if is_date {
                json!(age(value.as_str()))
            } else {
                value
            }
        });
        col.priority = printer["priority"].as_i64().unwrap_or(0);
        columns.push(col);
    }
    columns
}

/// Renders objects as a `meta.k8s.io/v1` Table; `include_object` is `Metadata` (the default),
/// `Object` or `None`; `definitions` false omits the column definitions (later watch events).
pub fn to_table(
    resource: &Resource,
    objects: &[&Value],
    list_metadata: Value,
    include_object: &str,
    definitions: bool,
) -> Value {
    let columns = if resource.is_custom() {
        custom_columns(resource)
    } else {
        builtin_columns(resource)
    };
    let definitions: Vec<Value> = if definitions {
        columns
            .iter()
            .map(|c| {
                let format = if c.name == "Name" { "name" } else { "" };
                json!({"name": c.name, "type": c.kind, "format": format, "description": c.name, "priority": c.priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> = columns.iter().map(|c| (c.cell)(object)).collect();
            let embedded = match include_object {
                "None" => Value::Null,
                "Object" => (*object).clone(),
                _ => {
                    let mut partial = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"].clone()});
                    if let Some(map) = partial["metadata"].as_object_mut() {
                        map.remove("managedFields");
                    }
                    partial
                }
            };
            json!({"cells": cells, "object": embedded})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata, "columnDefinitions": definitions, "rows": rows})
}

/// A human age like kubectl's (`5s`, `3m`, `2h`, `4d`).
fn age(created: Option<&str>) -> String {
    let Some(created) = created.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return "<unknown>".into();
    };
    let seconds = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    human_duration(seconds)
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[?(@.k=="v")].b`.
pub fn json_path(object: &Value, path: &str) -> Option<Value> {
    let mut current = vec![object.clone()];
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("[?(@.") {
            let end = after.find(")]")?;
            let filter = &after[..end];
            let (field, value) = filter.split_once("==")?;
            let value = value.trim().trim_matches('"').trim_matches('\'');
            current = current
                .iter()
                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                .filter(|item| item[field.trim()].as_str() == Some(value))
                .collect();
            rest = after[end + 2..].trim_start_matches('.');
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let index: usize = after[..end].parse().ok()?;
            current = current
                .iter()
                .filter_map(|v| v.get(index).cloned())
                .collect();
            rest = after[end + 1..].trim_start_matches('.');
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let field = &rest[..end];
            current = current
                .iter()
                .filter_map(|v| v.get(field).cloned())
                .collect();
            rest = rest[end..].trim_start_matches('.');
        }
    }
    match current.len() {
        0 => None,
        1 => current.pop(),
        _ => Some(Value::Array(current)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSONPath subset used by printer columns.
    #[test]
    fn json_path_subset() {
        let object = json!({"spec": {"planeID": "p"}, "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "False"}]}});
        assert_eq!(json_path(&object, ".spec.planeID"), Some(json!("p")));
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(json!("True"))
        );
        assert_eq!(
            json_path(&object, ".status.conditions[1].type"),
            Some(json!("X"))
        );
        assert_eq!(json_path(&object, ".status.missing"), None);
    }

    /// Secrets print TYPE and DATA like the real server.
    #[test]
    fn secrets_have_type_and_data_columns() {
        let secrets = crate::store::builtin_resources()
            .into_iter()
            .find(|r| r.plural == "secrets")
            .expect("secrets");
        let secret = json!({"metadata": {"name": "s", "creationTimestamp": "2020-01-01T00:00:00Z"}, "type": "Opaque", "data": {"a": "", "b": ""}});
        let table = to_table(&secrets, &[&secret], json!({}), "Metadata", true);
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["Name", "Type", "Data", "Age"]);
        assert_eq!(
            table["rows"][0]["cells"].as_array().expect("cells")[..3],
            [json!("s"), json!("Opaque"), json!(2)]
        );
    }
}
