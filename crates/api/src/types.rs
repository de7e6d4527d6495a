//! The spec and status types of BuildPlane and ClusterBuildPlane.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{self, ValidationError};

/// The spec of a namespaced BuildPlane.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "openchoreo.dev",
    version = "v1alpha1",
    kind = "BuildPlane",
    plural = "buildplanes",
    singular = "buildplane",
    namespaced,
    status = "BuildPlaneStatus",
    printcolumn = r#"{"name":"PlaneID","type":"string","jsonPath":".spec.planeID"}"#,
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.agentConnection.connected"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agentConnection.connectedAgents"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildPlaneSpec {
    /// Identifies the logical plane this CR connects to; must match the agent's planeID.
    /// Several CRs may share one planeID. When empty, the CR name is used.
    #[serde(default, rename = "planeID", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "validation::plane_id_schema")]
    pub plane_id: Option<String>,
    /// How the gateway authenticates this plane's cluster agent.
    pub cluster_agent: ClusterAgentConfig,
    /// External Secrets Operator ClusterSecretStore in the build plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_store_ref: Option<SecretStoreRef>,
    /// Name of the ObservabilityPlane used for monitoring and logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observability_plane_ref: Option<String>,
}

/// The spec of a cluster-scoped ClusterBuildPlane; `planeID` is required.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "openchoreo.dev",
    version = "v1alpha1",
    kind = "ClusterBuildPlane",
    plural = "clusterbuildplanes",
    singular = "clusterbuildplane",
    shortname = "cbp",
    shortname = "cbps",
    status = "BuildPlaneStatus",
    printcolumn = r#"{"name":"PlaneID","type":"string","jsonPath":".spec.planeID"}"#,
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.agentConnection.connected"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agentConnection.connectedAgents"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBuildPlaneSpec {
    /// Identifies the logical plane this CR connects to; must match the agent's planeID.
    #[serde(rename = "planeID")]
    #[schemars(schema_with = "validation::plane_id_schema")]
    pub plane_id: String,
    /// How the gateway authenticates this plane's cluster agent.
    pub cluster_agent: ClusterAgentConfig,
    /// External Secrets Operator ClusterSecretStore in the build plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_store_ref: Option<SecretStoreRef>,
    /// Name of the ClusterObservabilityPlane used for monitoring and logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observability_plane_ref: Option<String>,
}

/// Configuration for cluster-agent based communication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAgentConfig {
    /// PEM bundle of the CA(s) that sign the agent's client certificate.
    #[serde(rename = "clientCA")]
    pub client_ca: ValueFrom,
}

/// Either a reference to a Secret key or an inline value; exactly one must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretRef) != has(self.value)",
    "message": "exactly one of secretRef or value must be set"
}]))]
pub struct ValueFrom {
    /// Reference to a key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyReference>,
    /// Inline value (not recommended for sensitive data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Reference to one key of a Kubernetes Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    pub name: String,
    /// Namespace of the Secret; defaults to the CR's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key within the Secret.
    pub key: String,
}

/// Reference to an External Secrets Operator ClusterSecretStore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretStoreRef {
    /// Name of the ClusterSecretStore in the build plane.
    pub name: String,
}

/// Observed state of a plane CR.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildPlaneStatus {
    /// The generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `ClientCAResolved`, `AgentConnected`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "validation::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Connection state of the plane's agents, as seen by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_connection: Option<AgentConnectionStatus>,
}

/// Connection state of the agents serving one CR (OpenChoreo's `AgentConnectionStatus`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentConnectionStatus {
    /// Whether at least one agent is connected and authorised for this CR.
    pub connected: bool,
    /// Number of connected agents authorised for this CR.
    pub connected_agents: i32,
    /// When the CR last went from no agent to at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connected_time: Option<Time>,
    /// When the CR last went from at least one agent to none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_disconnected_time: Option<Time>,
    /// When the gateway last heard from an agent of this CR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Human-readable summary, for example "2 agents connected (HA mode)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Identifies one plane CR: `ns/name`, or `/name` for a cluster-scoped CR (OpenChoreo's crKey).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CrKey {
    /// Namespace, `None` for ClusterBuildPlanes.
    pub namespace: Option<String>,
    /// Name of the CR.
    pub name: String,
}

impl CrKey {
    /// Key of a namespaced BuildPlane.
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// Key of a ClusterBuildPlane.
    pub fn cluster(name: impl Into<String>) -> Self {
        Self {
            namespace: None,
            name: name.into(),
        }
    }

    /// The namespace segment used in proxy URLs (`_cluster` for cluster-scoped CRs).
    pub fn url_namespace(&self) -> &str {
        self.namespace
            .as_deref()
            .unwrap_or(crate::names::CLUSTER_SCOPE_SEGMENT)
    }

    /// Parses the URL form (`ns`, `name`), mapping `_cluster` (or empty) to cluster scope.
    pub fn from_url_segments(namespace: &str, name: &str) -> Self {
        if namespace.is_empty() || namespace == crate::names::CLUSTER_SCOPE_SEGMENT {
            Self::cluster(name)
        } else {
            Self::namespaced(namespace, name)
        }
    }

    /// Parses the display form `ns/name` or `/name`.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, name) = text.split_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        Some(if namespace.is_empty() {
            Self::cluster(name)
        } else {
            Self::namespaced(namespace, name)
        })
    }
}

impl fmt::Display for CrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.namespace.as_deref().unwrap_or(""),
            self.name
        )
    }
}

/// What the gateway and controller need from either plane kind.
pub trait PlaneCr: Resource + ResourceExt {
    /// `spec.planeID`, or the CR name when it is empty.
    fn effective_plane_id(&self) -> String;
    /// The CR's key.
    fn cr_key(&self) -> CrKey;
    /// The `clientCA` source.
    fn client_ca(&self) -> &ValueFrom;
    /// The status, if any.
    fn plane_status(&self) -> Option<&BuildPlaneStatus>;
    /// Namespace used for a `secretRef` without one (the CR's namespace; none for cluster CRs).
    fn default_secret_namespace(&self) -> Option<String>;
    /// Validates the spec beyond what the CRD schema enforces.
    fn validate(&self) -> Result<(), ValidationError>;

    /// The Secret (namespace, name, key) that `clientCA` refers to, if any.
    fn client_ca_secret(&self) -> Option<(Option<String>, String, String)> {
        let secret_ref = self.client_ca().secret_ref.as_ref()?;
        let namespace = secret_ref
            .namespace
            .clone()
            .or_else(|| self.default_secret_namespace());
        Some((namespace, secret_ref.name.clone(), secret_ref.key.clone()))
    }
}

impl PlaneCr for BuildPlane {
    fn effective_plane_id(&self) -> String {
        match self.spec.plane_id.as_deref() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => self.name_any(),
        }
    }

    fn cr_key(&self) -> CrKey {
        CrKey {
            namespace: self.namespace(),
            name: self.name_any(),
        }
    }

    fn client_ca(&self) -> &ValueFrom {
        &self.spec.cluster_agent.client_ca
    }

    fn plane_status(&self) -> Option<&BuildPlaneStatus> {
        self.status.as_ref()
    }

    fn default_secret_namespace(&self) -> Option<String> {
        self.namespace()
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(id) = self.spec.plane_id.as_deref() {
            validation::validate_plane_id("spec.planeID", id)?;
        }
        validation::validate_value_from("spec.clusterAgent.clientCA", self.client_ca(), true)
    }
}

impl PlaneCr for ClusterBuildPlane {
    fn effective_plane_id(&self) -> String {
        self.spec.plane_id.clone()
    }

    fn cr_key(&self) -> CrKey {
        CrKey::cluster(self.name_any())
    }

    fn client_ca(&self) -> &ValueFrom {
        &self.spec.cluster_agent.client_ca
    }

    fn plane_status(&self) -> Option<&BuildPlaneStatus> {
        self.status.as_ref()
    }

    fn default_secret_namespace(&self) -> Option<String> {
        None
    }

    fn validate(&self) -> Result<(), ValidationError> {
        validation::validate_plane_id("spec.planeID", &self.spec.plane_id)?;
        validation::validate_value_from("spec.clusterAgent.clientCA", self.client_ca(), false)
    }
}
