//! Names that the controller, gateway, agent and harness agree on.

use std::{fmt, str::FromStr};

/// The API group of every plane kind.
pub const GROUP: &str = "openchoreo.dev";
/// The served version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "openchoreo.dev/v1alpha1";
/// The planeType of BuildPlanes in gateway URLs (`?planeType=buildplane`); what agents send by
/// default and what the gateway reports.
pub const PLANE_TYPE: &str = "buildplane";
/// OpenChoreo v1.x's newer name for the same plane type; accepted wherever [`PLANE_TYPE`] is.
pub const WORKFLOW_PLANE_TYPE: &str = "workflowplane";
/// Namespace of the cluster agent in the build cluster.
pub const AGENT_NAMESPACE: &str = "openchoreo-build-plane";
/// Secret holding the agent's `ca.crt`, `tls.crt` and `tls.key` (the seed's name).
pub const AGENT_TLS_SECRET: &str = "cluster-agent-tls";
/// Secret holding the agent CA's private key (`ca.crt`, `ca.key`); only the agent reads it.
pub const AGENT_CA_KEY_SECRET: &str = "cluster-agent-ca";
/// ConfigMap (build cluster) carrying the gateway's serving CA under key `ca.crt`.
pub const GATEWAY_CA_CONFIGMAP: &str = "cluster-gateway-ca";
/// Key of a CA certificate in the Secrets and ConfigMaps above.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of a certificate in a TLS Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of a private key in a TLS Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Key of the CA private key in [`AGENT_CA_KEY_SECRET`].
pub const CA_KEY_KEY: &str = "ca.key";
/// Finalizer the controller puts on every plane CR.
pub const FINALIZER: &str = "openchoreo.dev/buildplane-cleanup";
/// Annotation with a human-readable name for UIs.
pub const ANNOTATION_DISPLAY_NAME: &str = "openchoreo.dev/display-name";
/// Annotation with a longer description.
pub const ANNOTATION_DESCRIPTION: &str = "openchoreo.dev/description";
/// The namespace placeholder for cluster-scoped CRs in gateway proxy URLs.
pub const CLUSTER_SCOPE_SEGMENT: &str = "_cluster";
/// Response header of a gateway's WebSocket upgrade (101 and 409): the answering replica's id.
pub const GATEWAY_REPLICA_HEADER: &str = "x-buildplane-gateway-replica";
/// Response header of a gateway's 101: how many gateway replicas serve behind the address; an
/// agent of ours holds one connection to each (see ARCHITECTURE.md, "Gateway replicas").
pub const GATEWAY_REPLICAS_HEADER: &str = "x-buildplane-gateway-replicas";
/// Upgrade query parameter: the replica ids the agent already holds a connection to, comma
/// separated; a replica named there answers 409 instead of admitting a second connection.
pub const HELD_REPLICAS_QUERY: &str = "held";

/// Condition types written by the controller.
pub mod condition {
    /// The `clientCA` resolved into at least one valid certificate.
    pub const CLIENT_CA_RESOLVED: &str = "ClientCAResolved";
    /// At least one agent is connected and authorised for this CR.
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    /// The CR is usable: CA resolved and an agent connected.
    pub const READY: &str = "Ready";
}

/// Condition reasons written by the controller.
pub mod reason {
    /// The CA resolved and is valid.
    pub const RESOLVED: &str = "Resolved";
    /// The referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// The referenced Secret has no such key.
    pub const KEY_NOT_FOUND: &str = "KeyNotFound";
    /// The value is not a PEM bundle with at least one certificate.
    pub const INVALID_PEM: &str = "InvalidPEM";
    /// Every certificate of the bundle has expired.
    pub const CA_EXPIRED: &str = "CAExpired";
    /// A certificate of the bundle expires soon.
    pub const CA_EXPIRES_SOON: &str = "CAExpiresSoon";
    /// The spec is invalid (for example both `secretRef` and `value`).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// At least one agent is connected.
    pub const AGENTS_CONNECTED: &str = "AgentsConnected";
    /// No agent is connected.
    pub const NO_AGENTS_CONNECTED: &str = "NoAgentsConnected";
    /// The gateway could not be reached.
    pub const GATEWAY_UNREACHABLE: &str = "GatewayUnreachable";
}

/// A planeType the gateway serves: BuildPlanes, under either name. Both share one planeID
/// space (an agent of planeID `p` serves the CRs of planeID `p` whichever name it dials with);
/// any other planeType (`dataplane`, `observabilityplane`) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlaneType {
    /// `buildplane`, [`PLANE_TYPE`].
    BuildPlane,
    /// `workflowplane`, [`WORKFLOW_PLANE_TYPE`].
    WorkflowPlane,
}

impl PlaneType {
    /// Every accepted planeType.
    pub const ALL: [PlaneType; 2] = [PlaneType::BuildPlane, PlaneType::WorkflowPlane];

    /// The name in URLs and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BuildPlane => PLANE_TYPE,
            Self::WorkflowPlane => WORKFLOW_PLANE_TYPE,
        }
    }
}

impl fmt::Display for PlaneType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A planeType other than `buildplane` and `workflowplane`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("planeType {0:?} is not served; expected buildplane or workflowplane")]
pub struct UnknownPlaneType(pub String);

impl FromStr for PlaneType {
    type Err = UnknownPlaneType;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|plane_type| plane_type.as_str() == text)
            .ok_or_else(|| UnknownPlaneType(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `buildplane` and `workflowplane` parse and print back; OpenChoreo's other plane types,
    /// other cases and the empty string are refused (issue #19: the gateway served
    /// `dataplane` and `observabilityplane` agents as build planes).
    #[test]
    fn plane_type_accepts_exactly_the_build_plane_names() {
        for (text, expected) in [
            ("buildplane", Some(PlaneType::BuildPlane)),
            ("workflowplane", Some(PlaneType::WorkflowPlane)),
            ("dataplane", None),
            ("observabilityplane", None),
            ("BuildPlane", None),
            ("buildplane ", None),
            ("", None),
        ] {
            let res = text.parse::<PlaneType>().ok();
            assert_eq!(res, expected, "{text:?}");
            if let Some(plane_type) = res {
                assert_eq!(plane_type.to_string(), text);
            }
        }
    }
}
