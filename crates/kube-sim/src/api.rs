//! The Kubernetes REST semantics over the store: create, get, list, update, patch (merge, JSON,
//! strategic, server-side apply), delete (finalizers, namespace termination, CRD cleanup,
//! preconditions), the status subresource, generation, managedFields and dry runs.

use serde_json::{Value, json};

use crate::{
    error::ApiError,
    events, kinds,
    managed::{self, Scope},
    schema,
    selector::{FieldSelector, LabelSelector},
    store::{ObjectKey, Resource, ResourceKey, Store, now_rfc3339},
    strategic,
};

/// The kinds of patch a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json` (built-in kinds only, as on the real server).
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchKind {
    /// The patch kind of a Content-Type.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Which part of an object a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The main resource (status changes ignored when status is a subresource).
    Main,
    /// The `/status` subresource (only status changes kept).
    Status,
    /// The `/approval` subresource of CertificateSigningRequests (only `status.conditions`).
    Approval,
    /// The `/ephemeralcontainers` subresource of Pods (only `spec.ephemeralContainers`).
    EphemeralContainers,
}

/// `fieldValidation`: what to do with unknown fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them with a warning (the server's default).
    #[default]
    Warn,
    /// Reject the request (what kubectl sends).
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter.
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        match text.unwrap_or("") {
            "" | "Warn" => Ok(Self::Warn),
            "Ignore" => Ok(Self::Ignore),
            "Strict" => Ok(Self::Strict),
            other => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of \"Ignore\", \"Warn\" or \"Strict\", got {other:?}"
            ))),
        }
    }
}

/// Options of a write, from the query string.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `fieldManager` (or the client's User-Agent prefix).
    pub manager: String,
    /// Whether `fieldManager` was given explicitly (server-side apply requires it).
    pub manager_explicit: bool,
    /// `fieldValidation`.
    pub field_validation: FieldValidation,
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    /// `force=true` for server-side apply.
    pub force: bool,
    /// Warnings for the `Warning` response header.
    pub warnings: Vec<String>,
    /// Who asks (`username`, `uid`, `groups`, `extra`); kube-sim's own token when `None`.
    pub user: Option<Value>,
    /// The write came through `events.k8s.io/v1` to the core events storage (stricter
    /// validation, managedFields in that version).
    pub events_api: bool,
}

/// Options of a delete (query string and `DeleteOptions` body).
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// Reads a `DeleteOptions` body (empty bodies allowed).
    pub fn from_body(body: &[u8], dry_run_query: bool) -> Result<Self, ApiError> {
        let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        Ok(Self {
            dry_run: dry_run_query
                || value["dryRun"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|v| v == "All")),
            uid: value["preconditions"]["uid"].as_str().map(str::to_owned),
            resource_version: value["preconditions"]["resourceVersion"]
                .as_str()
                .map(str::to_owned),
        })
    }
}

/// Whether a write was an update (takes ownership of what changed) or an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Update,
    Apply,
}

fn key_for(resource: &Resource, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        resource: resource.key(),
        namespace: if resource.namespaced {
            namespace.to_owned()
        } else {
            String::new()
        },
        name: name.to_owned(),
    }
}

fn rv_of(object: &Value) -> Option<&str> {
    object["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
}

fn scope_of(resource: &Resource, part: Part) -> Scope {
    match part {
        Part::Status | Part::Approval => Scope::Status,
        Part::Main | Part::EphemeralContainers if resource.status_subresource => Scope::Main,
        Part::Main | Part::EphemeralContainers => Scope::All,
    }
}

fn subresource_of(part: Part) -> &'static str {
    match part {
        Part::Main => "",
        Part::Status => "status",
        Part::Approval => "approval",
        Part::EphemeralContainers => "ephemeralcontainers",
    }
}

/// Whether the real server tracks `metadata.generation` for this resource.
fn tracks_generation(resource: &Resource) -> bool {
    resource.is_custom()
        || resource.is_crd()
        || matches!(resource.plural.as_str(), "deployments" | "pods")
        || kinds::is_job(resource)
}

/// Validates a name like the real server: namespaces are DNS labels, the rest DNS subdomains.
fn validate_name(resource: &Resource, name: &str) -> Result<(), ApiError> {
    let label = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    };
    let (ok, message) = if resource.is_namespace() {
        (
            label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        )
    } else {
        (
            name.len() <= 253 && name.split('.').all(label),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    };
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        &resource.qualified_kind(),
        name,
        &[(
            "metadata.name".into(),
            format!("Invalid value: {name:?}: {message}"),
        )],
    ))
}

/// Fills `apiVersion`/`kind` and applies the resource's admission (Secret `stringData`, CRD
/// names and status, CRD schemas with defaults, pruning and CEL).
fn admit(
    resource: &Resource,
    object: &mut Value,
    name: &str,
    old: Option<&Value>,
    options: &mut WriteOptions,
) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind);
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if resource.group.is_empty() && matches!(resource.plural.as_str(), "configmaps" | "secrets") {
        check_string_maps(resource, object)?;
    }
    if resource.group.is_empty() && resource.plural == "secrets" {
        fold_string_data(object);
        check_base64(resource, object)?;
        if object["type"].as_str().is_none_or(str::is_empty) {
            object["type"] = json!("Opaque");
        }
    }
    if resource.is_crd() {
        admit_crd(resource, object, name, old)?;
    }
    if kinds::is_job(resource) {
        kinds::admit_job(resource, object, name, old)?;
    }
    if kinds::is_endpoint_slice(resource) {
        kinds::admit_endpoint_slice(resource, object, name)?;
    }
    if kinds::is_csr(resource) && old.is_none() {
        let user = options.user.clone().unwrap_or_else(kinds::admin_user);
        kinds::admit_new_csr(resource, object, name, &user)?;
    }
    if kinds::is_pod(resource) && old.is_none() {
        kinds::admit_new_pod(resource, object, name)?;
    }
    if events::is_core(resource) {
        let causes = events::validate(object, old, options.events_api);
        if !causes.is_empty() {
            return Err(ApiError::invalid(&resource.qualified_kind(), name, &causes));
        }
    }
    if let Some(schema) = &resource.schema {
        let admission = schema::admit(schema, object, old);
        if !admission.unknown_fields.is_empty() {
            let listed: Vec<String> = admission
                .unknown_fields
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect();
            match options.field_validation {
                FieldValidation::Strict => {
                    return Err(ApiError::bad_request(format!(
                        "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {fields}",
                        kind = resource.kind,
                        version = resource.version,
                        fields = listed.join(", ")
                    )));
                }
                FieldValidation::Warn => options.warnings.extend(listed),
                FieldValidation::Ignore => {}
            }
        }
        if !admission.causes.is_empty() {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                name,
                &admission.causes,
            ));
        }
    }
    Ok(())
}

/// The string maps of ConfigMaps and Secrets hold strings only: the real server fails to decode
/// anything else into its Go struct (400, with the decoder's message).
fn check_string_maps(resource: &Resource, object: &Value) -> Result<(), ApiError> {
    for field in ["data", "binaryData", "stringData"] {
        let Some(map) = object.get(field).and_then(Value::as_object) else {
            continue;
        };
        for value in map.values() {
            let found = match value {
                Value::String(_) | Value::Null => continue,
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let kind = &resource.kind;
            return Err(ApiError::bad_request(format!(
                "{kind} in version {version:?} cannot be handled as a {kind}: json: cannot unmarshal {found} into Go struct field {kind}.{field} of type {target}",
                version = resource.version,
                target = if field == "data" && kind == "Secret" || field == "binaryData" {
                    "[]uint8"
                } else {
                    "string"
                },
            )));
        }
    }
    Ok(())
}

fn fold_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = object.get_mut("stringData").map(Value::take) else {
        return;
    };
    if let Some(map) = object.as_object_mut() {
        map.remove("stringData");
    }
    if let Value::Object(entries) = string_data {
        if !object["data"].is_object() {
            object["data"] = json!({});
        }
        for (key, value) in entries {
            let text = value.as_str().unwrap_or_default();
            object["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

fn check_base64(resource: &Resource, object: &Value) -> Result<(), ApiError> {
    use base64::Engine as _;
    for value in object["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, v)| v)
    {
        let ok = value.is_null()
            || value
                .as_str()
                .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
        if !ok {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"v1\" cannot be handled as a {kind}: illegal base64 data in data",
                kind = resource.kind
            )));
        }
    }
    Ok(())
}

/// CRD admission: the name rule, names defaults, and the status the real server reports
/// (`NamesAccepted`, `Established`, `acceptedNames`, `storedVersions`).
fn admit_crd(
    resource: &Resource,
    object: &mut Value,
    name: &str,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let group = object["spec"]["group"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let plural = object["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let kind = object["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut causes = Vec::new();
    if name != format!("{plural}.{group}") {
        causes.push((
            "metadata.name".to_owned(),
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    if kind.is_empty() {
        causes.push(("spec.names.kind".to_owned(), "Required value".to_owned()));
    }
    let versions = object["spec"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push((
            "spec.versions".to_owned(),
            "Invalid value: \"null\": must have exactly one version marked as storage version"
                .to_owned(),
        ));
    }
    if !matches!(
        object["spec"]["scope"].as_str(),
        Some("Namespaced" | "Cluster")
    ) {
        causes.push((
            "spec.scope".to_owned(),
            format!(
                "Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"",
                object["spec"]["scope"]
            ),
        ));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(&resource.qualified_kind(), name, &causes));
    }
    if object["spec"]["conversion"].is_null() {
        object["spec"]["conversion"] = json!({"strategy": "None"});
    }
    let names = &mut object["spec"]["names"];
    if names["singular"].as_str().is_none_or(str::is_empty) {
        names["singular"] = json!(kind.to_lowercase());
    }
    if names["listKind"].as_str().is_none_or(str::is_empty) {
        names["listKind"] = json!(format!("{kind}List"));
    }
    let accepted = object["spec"]["names"].clone();
    let storage: Vec<Value> = versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .map(|v| v["name"].clone())
        .collect();
    let since = |condition: &str| -> String {
        old.and_then(|o| o["status"]["conditions"].as_array())
            .into_iter()
            .flatten()
            .find(|c| c["type"] == condition)
            .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_owned))
            .unwrap_or_else(now_rfc3339)
    };
    let mut stored: Vec<Value> = old
        .and_then(|o| o["status"]["storedVersions"].as_array().cloned())
        .unwrap_or_default();
    for version in storage {
        if !stored.contains(&version) {
            stored.push(version);
        }
    }
    object["status"] = json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": since("NamesAccepted")},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": since("Established")}
        ],
        "acceptedNames": accepted,
        "storedVersions": stored,
    });
    Ok(())
}

/// Whether anything but metadata (and status, when it is a subresource) differs.
fn spec_changed(resource: &Resource, old: &Value, new: &Value) -> bool {
    let strip = |object: &Value| {
        let mut object = object.clone();
        if let Some(map) = object.as_object_mut() {
            map.remove("metadata");
            if resource.status_subresource {
                map.remove("status");
            }
        }
        object
    };
    strip(old) != strip(new)
}

/// Creates an object.
pub fn create(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    object: Value,
    options: &mut WriteOptions,
) -> Result<Value, ApiError> {
    create_with(store, resource, namespace, object, options, Op::Update)
}

fn create_with(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    mut object: Value,
    options: &mut WriteOptions,
    op: Op,
) -> Result<Value, ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let name = match object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        Some(name) => name.to_owned(),
        None => match object["metadata"]["generateName"].as_str() {
            Some(prefix) => {
                use rand::Rng as _;
                const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                let mut rng = rand::rng();
                let suffix: String = (0..5)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                    .collect();
                format!("{prefix}{suffix}")
            }
            None => {
                return Err(ApiError::invalid(
                    &resource.qualified_kind(),
                    "",
                    &[(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
        },
    };
    validate_name(resource, &name)?;
    if resource.namespaced {
        if namespace.is_empty() {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if let Some(body_ns) = object["metadata"]["namespace"].as_str()
            && !body_ns.is_empty()
            && body_ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        match store.get(&store.namespace_key(namespace)) {
            None => return Err(ApiError::not_found("namespaces", namespace)),
            Some(ns) if ns["metadata"]["deletionTimestamp"].is_string() => {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                        resource.qualified_plural()
                    ),
                ));
            }
            Some(_) => {}
        }
        object["metadata"]["namespace"] = json!(namespace);
    } else if let Some(map) = object["metadata"].as_object_mut() {
        map.remove("namespace");
    }
    object["metadata"]["name"] = json!(name);
    admit(resource, &mut object, &name, None, options)?;
    let key = key_for(resource, namespace, &name);
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(
            &resource.qualified_plural(),
            &name,
        ));
    }
    if let Some(map) = object["metadata"].as_object_mut() {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
        ] {
            map.remove(field);
        }
        if op == Op::Update {
            map.remove("managedFields");
        }
    }
    if resource.is_namespace() {
        object["spec"] = json!({"finalizers": ["kubernetes"]});
        object["status"] = json!({"phase": "Active"});
        object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
    } else if resource.status_subresource && !resource.is_crd() {
        // Status cannot be set on creation through the main resource.
        if let Some(map) = object.as_object_mut() {
            map.remove("status");
        }
    }
    if op == Op::Update && !options.manager.is_empty() {
        record_update(resource, None, &mut object, Part::Main, options);
    }
    if resource.is_crd() {
        record_crd_status(None, &mut object);
    }
    if events::is_core(resource) {
        events::shape_core(&mut object);
    }
    let mut object = store.stamp_new(object);
    if kinds::is_job(resource) {
        kinds::label_new_job(&mut object);
        // The Go struct's empty status is written out.
        object["status"] = json!({});
    }
    if kinds::is_csr(resource) {
        object["status"] = json!({});
    }
    if kinds::is_pod(resource) {
        object["status"] = kinds::new_pod_status(&object);
    }
    if !tracks_generation(resource)
        && let Some(meta) = object["metadata"].as_object_mut()
    {
        meta.remove("generation");
    }
    if options.dry_run {
        return Ok(object);
    }
    store.put(key, object, "ADDED")
}

/// Gets an object.
pub fn get(
    store: &Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    store
        .get(&key_for(resource, namespace, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&resource.qualified_plural(), name))
}

/// List options from the query string.
#[derive(Debug, Default)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit`.
    pub limit: Option<usize>,
    /// `continue`: the last key of the previous page.
    pub continue_from: Option<ObjectKey>,
}

/// Lists objects (a page of them when `limit` is set).
pub fn list(
    store: &Store,
    resource: &Resource,
    namespace: Option<&str>,
    options: &ListOptions,
) -> Result<Value, ApiError> {
    let key = resource.key();
    let mut matching = store
        .list_from(&key, namespace, options.continue_from.as_ref())
        .filter(|(_, object)| options.labels.matches(object) && options.fields.matches(object));
    let mut items = Vec::new();
    let mut last = None;
    let limit = options.limit.unwrap_or(usize::MAX).max(1);
    for (key, object) in matching.by_ref() {
        items.push(object.clone());
        last = Some(key.clone());
        if items.len() == limit {
            break;
        }
    }
    let mut metadata = json!({"resourceVersion": store.rv().to_string()});
    if options.limit.is_some() {
        let remaining = matching.count();
        if remaining > 0
            && let Some(last) = last
        {
            metadata["continue"] = json!(encode_continue(&last, store.rv()));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(json!({
        "apiVersion": resource.api_version(),
        "kind": format!("{}List", resource.kind),
        "metadata": metadata,
        "items": items,
    }))
}

/// Encodes a continue token: the last key returned and the list's resourceVersion.
pub fn encode_continue(last: &ObjectKey, rv: u64) -> String {
    use base64::Engine as _;
    let token = json!({"ns": last.namespace, "name": last.name, "rv": rv});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

/// Decodes a continue token into the key to continue after.
pub fn decode_continue(token: &str, resource: &ResourceKey) -> Result<ObjectKey, ApiError> {
    use base64::Engine as _;
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok(ObjectKey {
        resource: resource.clone(),
        namespace: value["ns"].as_str().ok_or_else(bad)?.to_owned(),
        name: value["name"].as_str().ok_or_else(bad)?.to_owned(),
    })
}

/// Replaces an object (PUT), honouring the resourceVersion precondition.
#[allow(clippy::too_many_arguments)]
pub fn update(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    mut object: Value,
    part: Part,
    options: &mut WriteOptions,
) -> Result<Value, ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let key = key_for(resource, namespace, name);
    let Some(old) = store.get(&key).cloned() else {
        // Only a few kinds are created by an update on the real server.
        let create_on_update = matches!(resource.plural.as_str(), "leases" | "events");
        if part == Part::Main && create_on_update {
            object["metadata"]["name"] = json!(name);
            return create(store, resource, namespace, object, options);
        }
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    if let Some(body_name) = object["metadata"]["name"].as_str()
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    match rv_of(&object) {
        Some(rv) if Some(rv) != rv_of(&old) => {
            return Err(ApiError::conflict(&resource.qualified_plural(), name));
        }
        Some(_) => {}
        // Custom resources (and CRDs) refuse unconditional updates.
        None if resource.is_custom() || resource.is_crd() => {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                name,
                &[(
                    "metadata.resourceVersion".into(),
                    "Invalid value: 0x0: must be specified for an update".into(),
                )],
            ));
        }
        None => {}
    }
    write(store, resource, key, old, object, part, options, Op::Update)
}

/// Applies a patch to an object (creating it for server-side apply).
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    part: Part,
    options: &mut WriteOptions,
) -> Result<Value, ApiError> {
    if kind == PatchKind::Strategic && resource.is_custom() {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        ));
    }
    let key = key_for(resource, namespace, name);
    let old = store.get(&key).cloned();
    let patch_value: Value = match kind {
        PatchKind::Apply => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
    };
    if kind == PatchKind::Apply {
        return apply(
            store,
            resource,
            namespace,
            name,
            key,
            old,
            patch_value,
            part,
            options,
        );
    }
    let Some(old) = old else {
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    let mut new = match kind {
        PatchKind::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch_value)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut new = old.clone();
            json_patch::patch(&mut new, &operations).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            if rv_of(&new) != rv_of(&old) && rv_of(&new).is_some() {
                return Err(ApiError::conflict(&resource.qualified_plural(), name));
            }
            new
        }
        _ => {
            if !patch_value.is_object() {
                return Err(ApiError::bad_request(
                    "error decoding patch: the patch must be a JSON object",
                ));
            }
            if let Some(rv) = rv_of(&patch_value)
                && Some(rv) != rv_of(&old)
            {
                return Err(ApiError::conflict(&resource.qualified_plural(), name));
            }
            if kind == PatchKind::Strategic {
                strategic::apply(&old, &patch_value)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?
            } else {
                let mut new = old.clone();
                json_patch::merge(&mut new, &patch_value);
                new
            }
        }
    };
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    write(store, resource, key, old, new, part, options, Op::Update)
}

/// The real server's CRD controllers write a CRD's status through `status` as `kube-apiserver`,
/// owning the accepted names and the two conditions (not `storedVersions`): kube-sim writes the
/// status itself and records that entry, anew whenever the status changes.
fn record_crd_status(old: Option<&Value>, new: &mut Value) {
    let same_status = old.is_some_and(|old| old["status"] == new["status"]);
    let mut entries = managed::read_entries(new);
    let existing = entries
        .iter()
        .position(|e| e.same_owner("kube-apiserver", "Update", "status"));
    if same_status && existing.is_some() {
        return;
    }
    let mut accepted = serde_json::Map::new();
    for name in new["status"]["acceptedNames"]
        .as_object()
        .into_iter()
        .flat_map(|names| names.keys())
    {
        accepted.insert(format!("f:{name}"), json!({}));
    }
    let condition = json!({".": {}, "f:lastTransitionTime": {}, "f:message": {}, "f:reason": {}, "f:status": {}, "f:type": {}});
    let fields = json!({"f:status": {"f:acceptedNames": accepted, "f:conditions": {
        "k:{\"type\":\"Established\"}": condition, "k:{\"type\":\"NamesAccepted\"}": condition}}});
    let entry = managed::Entry {
        manager: "kube-apiserver".into(),
        operation: "Update".into(),
        api_version: "apiextensions.k8s.io/v1".into(),
        time: now_rfc3339(),
        subresource: "status".into(),
        fields: managed::from_fields_v1(&fields),
    };
    match existing {
        Some(index) => entries[index] = entry,
        None => entries.push(entry),
    }
    managed::write_entries(new, &entries);
}

/// Records an "Update" write in `managedFields`; Events in the version they were written in.
fn record_update(
    resource: &Resource,
    old: Option<&Value>,
    new: &mut Value,
    part: Part,
    options: &WriteOptions,
) {
    if events::is_core(resource) {
        events::record_update(
            old,
            new,
            &options.manager,
            options.events_api,
            &now_rfc3339(),
        );
        return;
    }
    managed::record_update(
        old,
        new,
        resource.schema.as_ref(),
        scope_of(resource, part),
        &options.manager,
        &resource.api_version(),
        subresource_of(part),
        &now_rfc3339(),
    );
}

/// Server-side apply.
#[allow(clippy::too_many_arguments)]
fn apply(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    key: ObjectKey,
    old: Option<Value>,
    applied: Value,
    part: Part,
    options: &mut WriteOptions,
) -> Result<Value, ApiError> {
    if !options.manager_explicit {
        return Err(ApiError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            &[(
                "fieldManager".into(),
                "Required value: is required for apply patch".into(),
            )],
        ));
    }
    if !applied.is_object() {
        return Err(ApiError::bad_request(
            "error decoding YAML: the applied configuration must be an object",
        ));
    }
    let kind = applied["kind"].as_str().unwrap_or("");
    let api_version = applied["apiVersion"].as_str().unwrap_or("");
    if kind.is_empty() || api_version.is_empty() {
        return Err(ApiError::bad_request(format!(
            "error decoding YAML: Object 'Kind' is missing in '{}'",
            applied
        )));
    }
    if kind != resource.kind || api_version != resource.api_version() {
        return Err(ApiError::bad_request(format!(
            "the apiVersion and kind of the applied configuration ({api_version}, {kind}) do not match the resource ({}, {})",
            resource.api_version(),
            resource.kind
        )));
    }
    if let Some(body_name) = applied["metadata"]["name"].as_str()
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(old), Some(rv)) = (&old, rv_of(&applied))
        && Some(rv) != rv_of(old)
    {
        return Err(ApiError::conflict(&resource.qualified_plural(), name));
    }
    if let Some(schema) = &resource.schema {
        reject_undeclared_fields(resource, schema, &applied)?;
    }
    let mut applied = applied;
    if resource.group.is_empty() && resource.plural == "secrets" {
        fold_string_data(&mut applied);
    }
    let now = now_rfc3339();
    let result = managed::apply(
        old.as_ref(),
        &applied,
        resource.schema.as_ref(),
        scope_of(resource, part),
        &options.manager,
        options.force,
        &resource.api_version(),
        subresource_of(part),
        &now,
    );
    let mut new = match result {
        Ok(new) => new,
        Err(conflicts) => return Err(ApiError::apply_conflicts(&conflicts)),
    };
    match old {
        None => {
            if part == Part::Status {
                return Err(ApiError::not_found(&resource.qualified_plural(), name));
            }
            new["metadata"]["name"] = json!(name);
            create_with(store, resource, namespace, new, options, Op::Apply)
        }
        Some(old) => {
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            write(store, resource, key, old, new, part, options, Op::Apply)
        }
    }
}

/// Server-side apply builds a typed patch from the applied configuration, and a field the
/// schema does not declare fails that step whatever `fieldValidation` says: the real server
/// answers 500 with an empty reason (seen with kube-apiserver 1.37), where a create or update
/// prunes the field with a warning or, under Strict, answers 400.
fn reject_undeclared_fields(
    resource: &Resource,
    schema: &Value,
    applied: &Value,
) -> Result<(), ApiError> {
    let mut probe = applied.clone();
    let admission = schema::admit(schema, &mut probe, None);
    let Some(field) = admission.unknown_fields.first() else {
        return Ok(());
    };
    let metadata = &applied["metadata"];
    Err(ApiError::new(
        500,
        "",
        format!(
            "failed to create typed patch object ({}/{}; {}, Kind={}): .{field}: field not declared in schema",
            metadata["namespace"].as_str().unwrap_or(""),
            metadata["name"].as_str().unwrap_or(""),
            resource.api_version(),
            resource.kind,
        ),
    ))
}

/// The common tail of update and patch: subresource rules, admission, generation, managed
/// fields, finalizers, dry runs.
#[allow(clippy::too_many_arguments)]
fn write(
    store: &mut Store,
    resource: &Resource,
    key: ObjectKey,
    old: Value,
    mut new: Value,
    part: Part,
    options: &mut WriteOptions,
    op: Op,
) -> Result<Value, ApiError> {
    let name = key.name.clone();
    if !new.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    if part == Part::EphemeralContainers {
        kinds::write_ephemeral_containers(resource, &old, &mut new, &name)?;
    } else if part == Part::Approval {
        let conditions = new["status"].get("conditions").cloned();
        new = old.clone();
        match conditions {
            Some(conditions) => new["status"]["conditions"] = conditions,
            None => {
                if let Some(status) = new["status"].as_object_mut() {
                    status.remove("conditions");
                }
            }
        }
    } else if part == Part::Status {
        let status = new.get("status").cloned();
        let managed_fields = new["metadata"].get("managedFields").cloned();
        new = old.clone();
        match status {
            Some(status) => new["status"] = status,
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        if op == Op::Apply
            && let Some(managed_fields) = managed_fields
        {
            new["metadata"]["managedFields"] = managed_fields;
        }
    } else if resource.status_subresource && !resource.is_crd() {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    }
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    // Immutable metadata comes from the stored object.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
        "selfLink",
    ] {
        match old["metadata"].get(field) {
            Some(value) => new["metadata"][field] = value.clone(),
            None => {
                if let Some(map) = new["metadata"].as_object_mut() {
                    map.remove(field);
                }
            }
        }
    }
    if old["metadata"]["deletionTimestamp"].is_string() {
        let finalizers = |o: &Value| -> Vec<Value> {
            o["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let before = finalizers(&old);
        if finalizers(&new).iter().any(|f| !before.contains(f)) {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                &name,
                &[(
                    "metadata.finalizers".into(),
                    "Forbidden: no new finalizers can be added if the object is being deleted"
                        .into(),
                )],
            ));
        }
    }
    if resource.is_namespace() && part == Part::Main {
        // spec.finalizers of a namespace is managed by the server.
        new["spec"] = old["spec"].clone();
    }
    admit(resource, &mut new, &name, Some(&old), options)?;
    if kinds::is_csr(resource) {
        kinds::update_csr(resource, &old, &mut new, part)?;
    }
    if tracks_generation(resource) && spec_changed(resource, &old, &new) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    if op == Op::Update && !options.manager.is_empty() {
        let given = new["metadata"].get("managedFields");
        let edited = given.is_some() && given != old["metadata"].get("managedFields");
        if !edited {
            if let Some(previous) = old["metadata"].get("managedFields") {
                new["metadata"]["managedFields"] = previous.clone();
            }
            record_update(resource, Some(&old), &mut new, part, options);
        } else if given.is_some_and(|g| {
            g.as_array()
                .is_some_and(|a| a.iter().all(|e| e.as_object().is_none_or(|m| m.is_empty())))
        }) {
            // `managedFields: [{}]` clears them.
            if let Some(meta) = new["metadata"].as_object_mut() {
                meta.remove("managedFields");
            }
        }
    }
    if events::is_core(resource) {
        events::shape_core(&mut new);
    }
    if resource.is_crd() {
        record_crd_status(Some(&old), &mut new);
    }
    let comparable = |object: &Value| {
        let mut object = object.clone();
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
        }
        object
    };
    if comparable(&old) == comparable(&new) {
        // A no-op write does not bump the resourceVersion, as on the real server.
        return Ok(old);
    }
    let finalizers_empty = new["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    if options.dry_run {
        return Ok(new);
    }
    if new["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
        store.remove(&key)?;
        after_removal(store, &key)?;
        return Ok(new);
    }
    store.put(key, new, "MODIFIED")
}

/// Deletes an object: marks it when finalizers remain, removes it otherwise. Returns the object
/// and whether it is gone.
pub fn delete(
    store: &mut Store,
    resource: &Resource,
    namespace: &str,
    name: &str,
    options: &DeleteOptions,
) -> Result<(Value, bool), ApiError> {
    let key = key_for(resource, namespace, name);
    let Some(mut object) = store.get(&key).cloned() else {
        return Err(ApiError::not_found(&resource.qualified_plural(), name));
    };
    if let Some(uid) = &options.uid
        && object["metadata"]["uid"].as_str() != Some(uid.as_str())
    {
        return Err(ApiError::precondition(
            &resource.qualified_plural(),
            name,
            format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                object["metadata"]["uid"].as_str().unwrap_or("")
            ),
        ));
    }
    if let Some(rv) = &options.resource_version
        && rv_of(&object) != Some(rv.as_str())
    {
        return Err(ApiError::precondition(
            &resource.qualified_plural(),
            name,
            format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                rv_of(&object).unwrap_or("")
            ),
        ));
    }
    if options.dry_run {
        return Ok((object, false));
    }
    if resource.is_namespace() {
        return delete_namespace(store, key, object);
    }
    if resource.is_crd() {
        // The CRD's instances go first (their watchers see DELETED), then the CRD.
        let group = object["spec"]["group"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let plural = object["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for child in store.keys_of(&ResourceKey { group, plural }) {
            store.remove(&child)?;
        }
    }
    let has_finalizers = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok((object, false));
        }
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if let Some(generation) = object["metadata"]["generation"].as_i64() {
            object["metadata"]["generation"] = json!(generation + 1);
        }
        return Ok((store.put(key, object, "MODIFIED")?, false));
    }
    let removed = store.remove(&key)?.unwrap_or(object);
    after_removal(store, &key)?;
    Ok((removed, true))
}

/// Marks a namespace Terminating, deletes its contents (objects with finalizers stay until their
/// finalizers are removed) and removes it once empty.
fn delete_namespace(
    store: &mut Store,
    key: ObjectKey,
    mut object: Value,
) -> Result<(Value, bool), ApiError> {
    if !object["metadata"]["deletionTimestamp"].is_string() {
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        object["status"]["phase"] = json!("Terminating");
        object = store.put(key.clone(), object, "MODIFIED")?;
    }
    let namespace = key.name.clone();
    let resources: Vec<Resource> = store
        .resources()
        .iter()
        .filter(|r| r.namespaced)
        .cloned()
        .collect();
    for resource in resources {
        let children: Vec<ObjectKey> = store
            .list_from(&resource.key(), Some(&namespace), None)
            .map(|(k, _)| k.clone())
            .collect();
        for child in children {
            let Some(value) = store.get(&child).cloned() else {
                continue;
            };
            let has_finalizers = value["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if !has_finalizers {
                store.remove(&child)?;
            } else if !value["metadata"]["deletionTimestamp"].is_string() {
                let mut marked = value;
                marked["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                store.put(child, marked, "MODIFIED")?;
            }
        }
    }
    let gone = finish_namespace(store, &namespace)?;
    Ok((object, gone))
}

/// Removes a terminating namespace once it holds nothing; true when removed.
fn finish_namespace(store: &mut Store, namespace: &str) -> Result<bool, ApiError> {
    let ns_key = store.namespace_key(namespace);
    let Some(ns) = store.get(&ns_key) else {
        return Ok(true);
    };
    if !ns["metadata"]["deletionTimestamp"].is_string()
        || ns["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    {
        return Ok(false);
    }
    let keys: Vec<ResourceKey> = store
        .resources()
        .iter()
        .filter(|r| r.namespaced)
        .map(Resource::key)
        .collect();
    let empty = keys
        .iter()
        .all(|key| store.list_from(key, Some(namespace), None).next().is_none());
    if empty {
        store.remove(&ns_key)?;
    }
    Ok(empty)
}

/// After an object is gone: a terminating namespace it emptied goes too.
fn after_removal(store: &mut Store, key: &ObjectKey) -> Result<(), ApiError> {
    if !key.namespace.is_empty() {
        finish_namespace(store, &key.namespace)?;
    }
    Ok(())
}

/// The success Status of a delete of an object removed at once.
pub fn deleted_status(resource: &Resource, name: &str, uid: &Value) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
           "details": {"name": name, "group": resource.group, "kind": resource.plural, "uid": uid}})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Continue tokens round-trip; garbage is a 400.
    #[test]
    fn continue_tokens_round_trip() {
        let resource = ResourceKey {
            group: "".into(),
            plural: "configmaps".into(),
        };
        let key = ObjectKey {
            resource: resource.clone(),
            namespace: "ns".into(),
            name: "n".into(),
        };
        assert_eq!(
            decode_continue(&encode_continue(&key, 7), &resource).expect("valid"),
            key
        );
        assert_eq!(
            decode_continue("!!", &resource).expect_err("garbage").code,
            400
        );
    }

    /// Names are DNS subdomains (namespaces: labels), as the real server checks.
    #[test]
    fn names_are_validated() {
        let resources = crate::store::builtin_resources();
        let secrets = resources
            .iter()
            .find(|r| r.plural == "secrets")
            .expect("secrets");
        let namespaces = resources
            .iter()
            .find(|r| r.plural == "namespaces")
            .expect("ns");
        assert!(validate_name(secrets, "a.b-c").is_ok());
        assert_eq!(
            validate_name(secrets, "Bad_Name")
                .expect_err("invalid")
                .code,
            422
        );
        assert!(validate_name(namespaces, "a.b").is_err());
        assert!(validate_name(namespaces, "my-org").is_ok());
    }
}
