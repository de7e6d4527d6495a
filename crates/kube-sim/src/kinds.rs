//! Admission of built-in kinds whose API server strategy does more than store them: the
//! defaults and generated fields of `batch/v1` Jobs (and their pod templates), and the
//! validation of `certificates.k8s.io/v1` CertificateSigningRequests and their approval.
//!
//! Only what kube-apiserver itself does is here; the controllers of kube-controller-manager
//! (the job controller, the CSR signers) do not run in kube-sim.

use serde_json::{Value, json};

use crate::{error::ApiError, store::Resource};

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

/// The Job defaults of `SetDefaults_Job` and its pod template's, and the validation of the
/// template's `restartPolicy` (a Job's pods must not restart forever).
pub fn admit_job(resource: &Resource, object: &mut Value, name: &str) -> Result<(), ApiError> {
    if !object["spec"].is_object() {
        object["spec"] = json!({});
    }
    let given_restart = object["spec"]["template"]["spec"]["restartPolicy"]
        .as_str()
        .map(str::to_owned);
    match given_restart.as_deref() {
        Some("OnFailure" | "Never") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                name,
                &[(
                    "spec.template.spec.restartPolicy".into(),
                    format!(
                        "Unsupported value: {other:?}: supported values: \"OnFailure\", \"Never\""
                    ),
                )],
            ));
        }
        None => {
            return Err(ApiError::invalid(
                &resource.qualified_kind(),
                name,
                &[(
                    "spec.template.spec.restartPolicy".into(),
                    "Required value: valid values: \"OnFailure\", \"Never\"".into(),
                )],
            ));
        }
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
    Ok(())
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
}
