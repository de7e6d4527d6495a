//! Admission of built-in kinds whose API server strategy does more than store them: the
//! defaults and generated fields of `batch/v1` Jobs (and their pod templates), and the
//! validation of `certificates.k8s.io/v1` CertificateSigningRequests and their approval.
//!
//! Only what kube-apiserver itself does is here; the controllers of kube-controller-manager
//! (the job controller, the CSR signers) do not run in kube-sim.

use serde_json::{Map, Value, json};

use crate::{
    api::Part,
    error::ApiError,
    store::{Resource, now_rfc3339},
};

/// Whether this is `jobs.batch`.
pub fn is_job(resource: &Resource) -> bool {
    resource.group == "batch" && resource.plural == "jobs"
}

/// Whether this is `certificatesigningrequests.certificates.k8s.io`.
pub fn is_csr(resource: &Resource) -> bool {
    resource.group == "certificates.k8s.io" && resource.plural == "certificatesigningrequests"
}

/// Sets `object[field]` when it is absent or null.
fn default(object: &mut Value, field: &str, value: Value) {
    if object.get(field).is_none_or(Value::is_null) {
        object[field] = value;
    }
}

/// The defaults of a pod template's `spec` and its containers (`SetDefaults_PodSpec`,
/// `SetDefaults_Container`): what the real server stores for a template that gives none.
pub fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "securityContext", json!({}));
    default(spec, "schedulerName", json!("default-scheduler"));
    for list in ["initContainers", "containers"] {
        for container in spec[list].as_array_mut().into_iter().flatten() {
            default_container(container);
        }
    }
}

fn default_container(container: &mut Value) {
    if !container.is_object() {
        return;
    }
    default(container, "resources", json!({}));
    default(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    default(container, "terminationMessagePolicy", json!("File"));
    let image = container["image"].as_str().unwrap_or("").to_owned();
    default(container, "imagePullPolicy", json!(pull_policy(&image)));
    for port in container["ports"].as_array_mut().into_iter().flatten() {
        if port.is_object() {
            default(port, "protocol", json!("TCP"));
        }
    }
}

/// `Always` for an image without a tag or tagged `latest`, `IfNotPresent` otherwise (a digest
/// counts as a tag).
fn pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// A value as Go's `json.Marshal` writes it in field errors: object keys sorted.
fn go_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&map[k])))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// Whether a `matchLabels` selector selects these labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The Job validation of kube-apiserver that kube-sim repeats: the template's restart policy and
/// containers, non-negative counts, and on updates the fields a Job cannot change (`completions`
/// of a NonIndexed Job, `completionMode`, `selector`, and the pod template except the scheduling
/// fields and labels of a suspended Job).
fn validate_job(object: &Value, old: Option<&Value>) -> Vec<(String, String)> {
    let spec = &object["spec"];
    let mut causes: Vec<(String, String)> = Vec::new();
    for field in ["parallelism", "completions", "backoffLimit"] {
        if let Some(n) = spec[field].as_i64()
            && n < 0
        {
            causes.push((
                format!("spec.{field}"),
                format!("Invalid value: {n}: must be greater than or equal to 0"),
            ));
        }
    }
    let pod = &spec["template"]["spec"];
    if pod["containers"].as_array().is_none_or(Vec::is_empty) {
        causes.push((
            "spec.template.spec.containers".into(),
            "Required value".into(),
        ));
    }
    if !matches!(pod["restartPolicy"].as_str(), Some("OnFailure" | "Never")) {
        causes.push((
            "spec.template.spec.restartPolicy".into(),
            "Required value: valid values: \"OnFailure\", \"Never\"".into(),
        ));
    }
    let Some(old) = old else {
        return causes;
    };
    let was = &old["spec"];
    if spec["completions"] != was["completions"] && was["completionMode"] != "Indexed" {
        causes.push((
            "spec.completions".into(),
            format!("Invalid value: {}: field is immutable", spec["completions"]),
        ));
    }
    if spec["completionMode"] != was["completionMode"] {
        causes.push((
            "spec.completionMode".into(),
            format!(
                "Invalid value: {}: field is immutable",
                spec["completionMode"]
            ),
        ));
    }
    if spec["selector"] != was["selector"] {
        let labels = &spec["template"]["metadata"]["labels"];
        if !selects(&spec["selector"], labels) {
            causes.push((
                "spec.template.metadata.labels".into(),
                format!(
                    "Invalid value: {}: `selector` does not match template `labels`",
                    go_json(labels)
                ),
            ));
        }
        causes.push((
            "spec.selector".into(),
            format!(
                "Invalid value: {}: field is immutable",
                go_json(&spec["selector"])
            ),
        ));
    }
    // A suspended Job that never started may change its pods' scheduling and labels.
    let mutable = was["suspend"] == true && old["status"]["startTime"].is_null();
    let strip = |template: &Value| {
        let mut template = template.clone();
        if mutable {
            for (part, fields) in [
                ("metadata", &["labels", "annotations"][..]),
                (
                    "spec",
                    &["nodeSelector", "affinity", "tolerations", "schedulingGates"][..],
                ),
            ] {
                if let Some(map) = template[part].as_object_mut() {
                    for field in fields {
                        map.remove(*field);
                    }
                }
            }
        }
        template
    };
    let (new_template, old_template) = (strip(&spec["template"]), strip(&was["template"]));
    if new_template != old_template {
        let (field, value) = if mutable {
            ("spec.template.spec", &spec["template"]["spec"])
        } else {
            ("spec.template", &spec["template"])
        };
        causes.push((
            field.into(),
            format!("Invalid value: {}: field is immutable", go_json(value)),
        ));
    }
    causes
}

/// The Job defaults of `SetDefaults_Job` and its pod template's, and the Job validation
/// ([`validate_job`]).
pub fn admit_job(
    resource: &Resource,
    object: &mut Value,
    name: &str,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    if !object["spec"].is_object() {
        object["spec"] = json!({});
    }
    let spec = &mut object["spec"];
    if spec.get("completions").is_none_or(Value::is_null)
        && spec.get("parallelism").is_none_or(Value::is_null)
    {
        spec["completions"] = json!(1);
    }
    default(spec, "parallelism", json!(1));
    default(spec, "backoffLimit", json!(6));
    default(spec, "completionMode", json!("NonIndexed"));
    default(spec, "suspend", json!(false));
    let replacement = if spec["podFailurePolicy"].is_object() {
        "Failed"
    } else {
        "TerminatingOrFailed"
    };
    default(spec, "podReplacementPolicy", json!(replacement));
    default(spec, "manualSelector", json!(false));
    default_pod_spec(&mut spec["template"]["spec"]);
    let causes = validate_job(object, old);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&resource.qualified_kind(), name, &causes))
    }
}

/// What a Job's creation adds once its uid is known: the selector on
/// `batch.kubernetes.io/controller-uid` (unless `manualSelector`), the four job labels on the
/// pod template, and those labels on the Job itself when it has none.
pub fn label_new_job(object: &mut Value) {
    let uid = object["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let spec = &mut object["spec"];
    if spec["manualSelector"].as_bool() == Some(true) {
        return;
    }
    spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    let template = &mut spec["template"];
    if !template["metadata"].is_object() {
        template["metadata"] = json!({});
    }
    if !template["metadata"]["labels"].is_object() {
        template["metadata"]["labels"] = json!({});
    }
    for (label, value) in [
        ("batch.kubernetes.io/controller-uid", &uid),
        ("batch.kubernetes.io/job-name", &name),
        ("controller-uid", &uid),
        ("job-name", &name),
    ] {
        template["metadata"]["labels"][label] = json!(value);
    }
    let labels = template["metadata"]["labels"].clone();
    if object["metadata"]["labels"]
        .as_object()
        .is_none_or(serde_json::Map::is_empty)
    {
        object["metadata"]["labels"] = labels;
    }
}

/// The identity kube-sim's own token stands for, as a SelfSubjectReview or a
/// CertificateSigningRequest's requester fields show it.
pub fn admin_user() -> Value {
    json!({"username": "kube-sim:admin", "groups": ["system:masters", "system:authenticated"]})
}

/// Whether a PEM text holds a block of this type.
fn has_pem_block(text: &[u8], label: &str) -> bool {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let text = String::from_utf8_lossy(text);
    text.find(&begin)
        .is_some_and(|start| text[start + begin.len()..].contains(&end))
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// A new CertificateSigningRequest: `spec.request` must be a PEM certificate request, the
/// requester's identity is recorded in `spec.username`/`groups`, and status starts empty.
pub fn admit_new_csr(
    resource: &Resource,
    object: &mut Value,
    name: &str,
    user: &Value,
) -> Result<(), ApiError> {
    let request = object["spec"]["request"].as_str().unwrap_or("").to_owned();
    let Some(bytes) = decode_base64(&request) else {
        // Go's decoder names the first byte outside the alphabet (or the end, for bad padding).
        let at = request
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b"+/=".contains(&b)))
            .unwrap_or(request.len());
        return Err(ApiError::bad_request(format!(
            "CertificateSigningRequest in version \"v1\" cannot be handled as a CertificateSigningRequest: illegal base64 data at input byte {at}"
        )));
    };
    let mut causes: Vec<(String, String)> = Vec::new();
    if !has_pem_block(&bytes, "CERTIFICATE REQUEST") {
        causes.push((
            "spec.request".into(),
            format!("Invalid value: {request:?}: PEM block type must be CERTIFICATE REQUEST"),
        ));
    }
    match object["spec"]["signerName"].as_str().unwrap_or("") {
        "" => causes.push(("spec.signerName".into(), "Required value".into())),
        signer
            if !signer
                .split_once('/')
                .is_some_and(|(domain, path)| domain.contains('.') && !path.is_empty()) =>
        {
            causes.push((
                "spec.signerName".into(),
                format!("Invalid value: {signer:?}: must be a fully qualified domain and path of the form 'example.com/signer-name'"),
            ));
        }
        _ => {}
    }
    match object["spec"]["usages"]
        .as_array()
        .filter(|u| !u.is_empty())
    {
        None => causes.push(("spec.usages".into(), "Required value".into())),
        Some(usages) => {
            for (i, usage) in usages.iter().enumerate() {
                let usage = usage.as_str().unwrap_or("");
                if !KEY_USAGES.contains(&usage) {
                    let supported: Vec<String> =
                        KEY_USAGES.iter().map(|u| format!("{u:?}")).collect();
                    causes.push((
                        format!("spec.usages[{i}]"),
                        format!(
                            "Unsupported value: {usage:?}: supported values: {}",
                            supported.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    if let Some(seconds) = object["spec"]["expirationSeconds"].as_i64()
        && seconds < 600
    {
        causes.push((
            "spec.expirationSeconds".into(),
            format!(
                "Invalid value: {seconds}: may not specify a duration less than 600 seconds (10 minutes)"
            ),
        ));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(&resource.qualified_kind(), name, &causes));
    }
    let spec = &mut object["spec"];
    for field in ["username", "uid", "groups", "extra"] {
        if let Some(map) = spec.as_object_mut() {
            map.remove(field);
        }
        if let Some(value) = user.get(field) {
            spec[field] = value.clone();
        }
    }
    Ok(())
}

const APPROVAL_TYPES: [&str; 2] = ["Approved", "Denied"];

/// The key usages a CertificateSigningRequest may ask for, as the real server lists them.
const KEY_USAGES: [&str; 23] = [
    "any",
    "cert sign",
    "client auth",
    "code signing",
    "content commitment",
    "crl sign",
    "data encipherment",
    "decipher only",
    "digital signature",
    "email protection",
    "encipher only",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "key agreement",
    "key encipherment",
    "microsoft sgc",
    "netscape sgc",
    "ocsp signing",
    "s/mime",
    "server auth",
    "signing",
    "timestamping",
];

/// An update of a CertificateSigningRequest: the spec never changes (a change is ignored, as on
/// the real server); through `status` and `approval`, conditions get their timestamps and are
/// validated, and approval conditions are added only through `approval` and never removed.
pub fn update_csr(
    resource: &Resource,
    old: &Value,
    new: &mut Value,
    part: Part,
) -> Result<(), ApiError> {
    new["spec"] = old["spec"].clone();
    if part == Part::Main {
        return Ok(());
    }
    let now = now_rfc3339();
    let old_conditions: Vec<Value> = old["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut causes: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for (i, condition) in new["status"]["conditions"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if !condition.is_object() {
            continue;
        }
        let kind = condition["type"].as_str().unwrap_or("").to_owned();
        let status = condition["status"].as_str().unwrap_or("").to_owned();
        if kind.is_empty() {
            causes.push((
                format!("status.conditions[{i}].type"),
                "Required value".into(),
            ));
        }
        if status.is_empty() {
            causes.push((
                format!("status.conditions[{i}].status"),
                "Required value".into(),
            ));
        } else if !["True", "False", "Unknown"].contains(&status.as_str()) {
            causes.push((
                format!("status.conditions[{i}].status"),
                format!(
                    "Unsupported value: {status:?}: supported values: \"False\", \"True\", \"Unknown\""
                ),
            ));
        } else if APPROVAL_TYPES.contains(&kind.as_str()) && status != "True" {
            causes.push((
                format!("status.conditions[{i}].status"),
                format!("Unsupported value: {status:?}: supported values: \"True\""),
            ));
        }
        if APPROVAL_TYPES.contains(&kind.as_str())
            && seen
                .iter()
                .any(|k| k != &kind && APPROVAL_TYPES.contains(&k.as_str()))
        {
            causes.push((
                format!("status.conditions[{i}].type"),
                format!(
                    "Invalid value: {kind:?}: Approved and Denied conditions are mutually exclusive"
                ),
            ));
        }
        if seen.contains(&kind) && !kind.is_empty() {
            causes.push((
                format!("status.conditions[{i}].type"),
                format!("Duplicate value: {kind:?}"),
            ));
        }
        seen.push(kind.clone());
        if condition["lastUpdateTime"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            condition["lastUpdateTime"] = json!(now);
        }
        if condition["lastTransitionTime"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            let previous = old_conditions.iter().find_map(|c| {
                (c["type"] == condition["type"] && c["status"] == condition["status"])
                    .then(|| c["lastTransitionTime"].as_str())
                    .flatten()
            });
            condition["lastTransitionTime"] = json!(previous.unwrap_or(&now));
        }
    }
    let had = |kind: &str| old_conditions.iter().any(|c| c["type"] == kind);
    for kind in APPROVAL_TYPES {
        let has = seen.iter().any(|k| k == kind);
        if had(kind) && !has {
            causes.push((
                "status.conditions".into(),
                format!("Forbidden: updates may not remove a condition of type {kind:?}"),
            ));
        }
        if part == Part::Status && has && !had(kind) {
            causes.push((
                "status.conditions".into(),
                format!("Forbidden: updates may not add a condition of type {kind:?}"),
            ));
        }
    }
    if part == Part::Status
        && let Some(certificate) = new["status"]["certificate"].as_str()
        && !certificate.is_empty()
        && !decode_base64(certificate).is_some_and(|pem| has_pem_block(&pem, "CERTIFICATE"))
    {
        causes.push((
            "status.certificate".into(),
            "Invalid value: \"<certificate data>\": must contain at least one CERTIFICATE PEM block"
                .into(),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &resource.qualified_kind(),
            new["metadata"]["name"].as_str().unwrap_or(""),
            &causes,
        ))
    }
}

/// Whether this is the core `pods` resource.
pub fn is_pod(resource: &Resource) -> bool {
    resource.group.is_empty() && resource.plural == "pods"
}

/// A new Pod as the real server stores it: the Go defaults of its spec and containers
/// (`SetDefaults_Pod`, `SetDefaults_PodSpec`, `SetDefaults_Container`) and the status it starts
/// with (`Pending`, the QoS class). Ephemeral containers cannot be set on creation.
pub fn admit_new_pod(resource: &Resource, object: &mut Value, name: &str) -> Result<(), ApiError> {
    if object["spec"]["ephemeralContainers"]
        .as_array()
        .is_some_and(|list| !list.is_empty())
    {
        return Err(ApiError::invalid(
            &resource.qualified_kind(),
            name,
            &[(
                "spec.ephemeralContainers".into(),
                "Forbidden: cannot be set on create".into(),
            )],
        ));
    }
    let spec = &mut object["spec"];
    if spec.is_object() {
        default_pod_spec(spec);
        default(spec, "enableServiceLinks", json!(true));
    }
    Ok(())
}

/// The status a new Pod starts with: `Pending` and its QoS class (`BestEffort` without requests
/// or limits, `Guaranteed` when every container limits CPU and memory and requests what it
/// limits, `Burstable` otherwise).
pub fn new_pod_status(object: &Value) -> Value {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| object["spec"][*list].as_array().into_iter().flatten())
        .collect();
    let resources = |c: &Value, kind: &str| -> Map<String, Value> {
        c["resources"][kind]
            .as_object()
            .cloned()
            .unwrap_or_default()
    };
    let best_effort = containers
        .iter()
        .all(|c| resources(c, "requests").is_empty() && resources(c, "limits").is_empty());
    let guaranteed = !containers.is_empty()
        && containers.iter().all(|c| {
            let limits = resources(c, "limits");
            let requests = resources(c, "requests");
            ["cpu", "memory"].iter().all(|r| limits.contains_key(*r))
                && requests
                    .iter()
                    .all(|(name, value)| limits.get(name) == Some(value))
        });
    let class = if best_effort {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    };
    json!({"phase": "Pending", "qosClass": class})
}

/// The fields an ephemeral container may not set (`allowedEphemeralContainerFields` of the real
/// server's validation), in the order it reports them.
const EPHEMERAL_FORBIDDEN: &[&str] = &[
    "ports",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
];

/// `IsDNS1123Label`'s complaints about a container name.
fn dns_label_errors(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.len() > 63 {
        errors.push("must be no more than 63 characters".to_owned());
    }
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if !ok {
        errors.push("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_owned());
    }
    errors
}

/// A write to `pods/NAME/ephemeralcontainers`: only `spec.ephemeralContainers` of `new` is
/// kept (the rest of the pod is the stored one, as on the real server); new ephemeral
/// containers get the container defaults; existing ones may be neither removed nor changed (the
/// message ends with a newline, where the real server goes on with a diff of its Go structs for a
/// change); the others are checked as the real server checks them.
pub fn write_ephemeral_containers(
    resource: &Resource,
    old: &Value,
    new: &mut Value,
    name: &str,
) -> Result<(), ApiError> {
    let mut ephemeral: Vec<Value> = new["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let metadata = new["metadata"].clone();
    *new = old.clone();
    if let Some(rv) = metadata.get("resourceVersion") {
        new["metadata"]["resourceVersion"] = rv.clone();
    }
    for container in &mut ephemeral {
        default_container(container);
    }
    let existing: Vec<Value> = old["spec"]["ephemeralContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let name_of = |c: &Value| c["name"].as_str().unwrap_or("").to_owned();
    let mut causes: Vec<(String, String)> = Vec::new();
    for before in &existing {
        match ephemeral.iter().find(|c| name_of(c) == name_of(before)) {
            None => causes.push((
                "spec.ephemeralContainers".into(),
                format!(
                    "Forbidden: existing ephemeral containers {:?} may not be removed\n",
                    name_of(before)
                ),
            )),
            Some(after) if after != before => causes.push((
                "spec.ephemeralContainers".into(),
                format!(
                    "Forbidden: existing ephemeral containers {:?} may not be changed\n",
                    name_of(before)
                ),
            )),
            Some(_) => {}
        }
    }
    if causes.is_empty() {
        let regular: Vec<String> = ["initContainers", "containers"]
            .iter()
            .flat_map(|list| old["spec"][*list].as_array().into_iter().flatten())
            .map(name_of)
            .collect();
        let mut seen = regular.clone();
        for (index, container) in ephemeral.iter().enumerate() {
            let path = format!("spec.ephemeralContainers[{index}]");
            let container_name = name_of(container);
            // As the real server checks them: conflicts and the target first, then the
            // container's own fields.
            if !container_name.is_empty() && seen.contains(&container_name) {
                causes.push((
                    format!("{path}.name"),
                    format!("Duplicate value: {container_name:?}"),
                ));
            }
            if let Some(target) = container["targetContainerName"]
                .as_str()
                .filter(|t| !t.is_empty())
                && !regular.iter().any(|r| r == target)
            {
                causes.push((
                    format!("{path}.targetContainerName"),
                    format!("Not found: {target:?}"),
                ));
            }
            if container_name.is_empty() {
                causes.push((format!("{path}.name"), "Required value".into()));
            } else {
                for error in dns_label_errors(&container_name) {
                    causes.push((
                        format!("{path}.name"),
                        format!("Invalid value: {container_name:?}: {error}"),
                    ));
                }
            }
            seen.push(container_name);
            if container["image"].as_str().is_none_or(str::is_empty) {
                causes.push((format!("{path}.image"), "Required value".into()));
            }
            for field in EPHEMERAL_FORBIDDEN {
                let set = match container.get(*field) {
                    None | Some(Value::Null) => false,
                    Some(Value::Object(map)) => !map.is_empty(),
                    Some(Value::Array(list)) => !list.is_empty(),
                    Some(_) => true,
                };
                if set {
                    causes.push((
                        format!("{path}.{field}"),
                        "Forbidden: cannot be set for an Ephemeral Container".into(),
                    ));
                }
            }
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(&resource.qualified_kind(), name, &causes));
    }
    if ephemeral.is_empty() {
        if let Some(spec) = new["spec"].as_object_mut() {
            spec.remove("ephemeralContainers");
        }
    } else {
        new["spec"]["ephemeralContainers"] = Value::Array(ephemeral);
    }
    Ok(())
}

/// Whether this is `endpointslices.discovery.k8s.io`.
pub fn is_endpoint_slice(resource: &Resource) -> bool {
    resource.group == "discovery.k8s.io" && resource.plural == "endpointslices"
}

/// The address checks of `ValidateEndpointSlice`: an IPv4 or IPv6 slice's addresses are IPs of
/// that family outside the unspecified, loopback and link-local ranges (`ValidateEndpointIP`),
/// an FQDN slice's are domain names of at least two labels (`IsFullyQualifiedDomainName`).
pub fn admit_endpoint_slice(
    resource: &Resource,
    object: &Value,
    name: &str,
) -> Result<(), ApiError> {
    let causes = validate_endpoint_slice(object);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&resource.qualified_kind(), name, &causes))
    }
}

fn validate_endpoint_slice(object: &Value) -> Vec<(String, String)> {
    let address_type = object["addressType"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    let endpoints = object["endpoints"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for (e, endpoint) in endpoints.iter().enumerate() {
        let addresses = endpoint["addresses"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for (a, address) in addresses.iter().enumerate() {
            let field = format!("endpoints[{e}].addresses[{a}]");
            let address = address.as_str().unwrap_or_default();
            let invalid = |message: &str| {
                (
                    field.clone(),
                    format!("Invalid value: {}: {message}", go_json(&json!(address))),
                )
            };
            match address_type {
                "IPv4" | "IPv6" => match address.parse::<std::net::IpAddr>() {
                    Ok(ip) if ip.is_ipv4() != (address_type == "IPv4") => {
                        causes.push(invalid(&format!("must be an {address_type} address")));
                    }
                    Ok(ip) => causes.extend(endpoint_ip_problems(ip).iter().map(|p| invalid(p))),
                    Err(_) => causes.push(invalid("must be a valid IP address")),
                },
                "FQDN" if address.is_empty() => {
                    causes.push((field.clone(), "Required value".into()))
                }
                "FQDN" => {
                    if let Some(problem) = fqdn_problem(address) {
                        causes.push(invalid(problem));
                    }
                }
                _ => {}
            }
        }
    }
    causes
}

/// `ValidateEndpointIP`'s ranges.
fn endpoint_ip_problems(ip: std::net::IpAddr) -> Vec<String> {
    use std::net::IpAddr;
    let (unspecified, loopback, link_local, link_local_multicast) = match ip {
        IpAddr::V4(v4) => (
            v4.is_unspecified(),
            v4.is_loopback(),
            v4.is_link_local(),
            v4.octets()[..3] == [224, 0, 0],
        ),
        IpAddr::V6(v6) => (
            v6.is_unspecified(),
            v6.is_loopback(),
            v6.segments()[0] & 0xffc0 == 0xfe80,
            v6.segments()[0] == 0xff02,
        ),
    };
    let mut problems = Vec::new();
    if unspecified {
        problems.push(format!("may not be unspecified ({ip})"));
    }
    if loopback {
        problems.push("may not be in the loopback range (127.0.0.0/8, ::1/128)".into());
    }
    if link_local {
        problems.push("may not be in the link-local range (169.254.0.0/16, fe80::/10)".into());
    }
    if link_local_multicast {
        problems
            .push("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)".into());
    }
    problems
}

/// `IsFullyQualifiedDomainName`: a DNS subdomain of at least two labels (a trailing dot
/// allowed).
fn fqdn_problem(name: &str) -> Option<&'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        Some(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    } else if !name.contains('.') {
        Some("should be a domain with at least two segments separated by dots")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Untagged and `latest` images are pulled always, tags and digests if not present.
    #[test]
    fn pull_policies_follow_the_tag() {
        assert_eq!(pull_policy("busybox"), "Always");
        assert_eq!(pull_policy("busybox:latest"), "Always");
        assert_eq!(pull_policy("busybox:1.36"), "IfNotPresent");
        assert_eq!(pull_policy("registry:5000/busybox"), "Always");
        assert_eq!(pull_policy("registry:5000/busybox:1"), "IfNotPresent");
        assert_eq!(pull_policy("busybox@sha256:abc"), "IfNotPresent");
    }

    /// The real server's EndpointSlice address rules: loopback, unspecified and link-local IPs
    /// are refused (127.0.0.1 in an IPv4 slice is what the harness once wrote), an IP of the
    /// other family too, and an FQDN needs two labels.
    #[test]
    fn endpoint_slice_addresses_follow_the_servers_rules() {
        let slice = |address_type: &str, address: &str| json!({"addressType": address_type, "endpoints": [{"addresses": [address]}]});
        let refused = |address_type: &str, address: &str| -> Vec<String> {
            validate_endpoint_slice(&slice(address_type, address))
                .into_iter()
                .map(|(field, message)| format!("{field}: {message}"))
                .collect()
        };
        assert!(refused("IPv4", "10.0.0.7").is_empty());
        assert!(refused("IPv6", "fd00::7").is_empty());
        assert!(refused("FQDN", "gateway-0.localhost").is_empty());
        assert!(refused("FQDN", "gateway-0.localhost.").is_empty());
        assert_eq!(
            refused("IPv4", "127.0.0.1"),
            [
                "endpoints[0].addresses[0]: Invalid value: \"127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
            ]
        );
        assert_eq!(refused("IPv6", "::1").len(), 1);
        assert_eq!(
            refused("IPv4", "0.0.0.0"),
            [
                "endpoints[0].addresses[0]: Invalid value: \"0.0.0.0\": may not be unspecified (0.0.0.0)"
            ]
        );
        assert_eq!(refused("IPv4", "169.254.1.1").len(), 1);
        assert_eq!(refused("IPv4", "224.0.0.5").len(), 1);
        assert_eq!(refused("IPv6", "fe80::1").len(), 1);
        assert_eq!(refused("IPv4", "fd00::7").len(), 1);
        assert_eq!(refused("IPv4", "not-an-ip").len(), 1);
        assert_eq!(
            refused("FQDN", "localhost"),
            [
                "endpoints[0].addresses[0]: Invalid value: \"localhost\": should be a domain with at least two segments separated by dots"
            ]
        );
        assert_eq!(refused("FQDN", "Upper.case").len(), 1);
        assert_eq!(
            refused("FQDN", ""),
            ["endpoints[0].addresses[0]: Required value"]
        );
    }
}
