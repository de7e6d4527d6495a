//! The values of the k3d layout (`k3d/values.yaml`), named like OpenChoreo's Helm values.
//!
//! Unknown keys are rejected, so a misspelt value fails loudly instead of being ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::K3dError;

/// Namespace of the gateway and the controller in the control cluster.
pub const CONTROL_NAMESPACE: &str = "openchoreo-control-plane";
/// Name of the gateway's Deployment and ClusterIP Service.
pub const GATEWAY_NAME: &str = "cluster-gateway";
/// Name of the LoadBalancer Service that the k3d load balancer publishes on the host.
pub const GATEWAY_EXTERNAL_NAME: &str = "cluster-gateway-external";
/// Name of the controller's Deployment.
pub const CONTROLLER_NAME: &str = "buildplane-controller";

/// Everything `k3d/values.yaml` holds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Values {
    /// Settings shared by every component.
    pub global: Global,
    /// The two k3d clusters.
    pub clusters: Clusters,
    /// The cluster gateway (control cluster).
    pub cluster_gateway: ClusterGateway,
    /// The BuildPlane controller (control cluster).
    pub controller_manager: ControllerManager,
    /// The default cluster agent (build cluster).
    pub cluster_agent: ClusterAgent,
    /// The BuildPlane registered for the default agent.
    pub registration: Registration,
}

/// Settings shared by every component.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Global {
    /// `imagePullPolicy` of every container (`IfNotPresent` or `Never`: images are imported).
    pub image_pull_policy: String,
}

/// The two clusters.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clusters {
    /// The k3s image of both clusters (`rancher/k3s:v1.35.4-k3s1`).
    pub k3s_image: String,
    /// The control cluster (gateway, controller, CRDs).
    pub control: ClusterValues,
    /// The build cluster (agents).
    pub build: ClusterValues,
}

/// One cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterValues {
    /// k3d cluster name; the kube context is `k3d-<name>`.
    pub name: String,
    /// Host port of the Kubernetes API.
    pub api_port: u16,
}

impl ClusterValues {
    /// The kubeconfig context k3d creates for this cluster.
    pub fn context(&self) -> String {
        format!("k3d-{}", self.name)
    }
}

/// A container image.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// Repository (`buildplane/cluster-gateway`).
    pub repository: String,
    /// Tag (`dev`).
    pub tag: String,
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// The cluster gateway.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterGateway {
    /// Replicas (1 to 16): each agent holds a connection to every one, so any replica routes
    /// any request (ARCHITECTURE.md, "Gateway replicas").
    pub replicas: u32,
    /// Image.
    pub image: Image,
    /// Agent listener port.
    pub port: u16,
    /// Internal API port.
    pub internal_port: u16,
    /// Health and metrics port (plain HTTP).
    pub health_port: u16,
    /// Host port of the agent listener (k3d load balancer of the control cluster).
    pub host_port: u16,
    /// Host port of the internal API.
    pub internal_host_port: u16,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: String,
    /// `--heartbeat-timeout`.
    pub heartbeat_timeout: String,
    /// `--max-concurrent-handshakes`.
    pub max_concurrent_handshakes: u32,
    /// `--max-connections-per-identity`.
    pub max_connections_per_identity: u32,
    /// `--plane-rate-limit`: proxied requests per second per planeID and replica (0: none).
    #[serde(default)]
    pub plane_rate_limit: u32,
    /// `--plane-rate-burst`: requests one planeID may send at once after a quiet spell (0:
    /// one second's worth of `planeRateLimit`).
    #[serde(default)]
    pub plane_rate_burst: u32,
    /// `--plane-rate-request-bytes`: response bytes that cost one more request under
    /// `planeRateLimit` (0: every request costs one, whatever it returns).
    #[serde(default = "default_plane_rate_request_bytes")]
    pub plane_rate_request_bytes: u32,
    /// Serving certificate.
    pub tls: GatewayTls,
    /// Internal API client CA.
    pub internal_tls: InternalTls,
}

/// The gateway's serving certificate.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTls {
    /// Secret with `tls.crt`, `tls.key` and `ca.crt`.
    pub secret_name: String,
    /// DNS names of the certificate.
    pub dns_names: Vec<String>,
}

/// The CA of the internal API's clients.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InternalTls {
    /// Secret with `ca.crt`.
    #[serde(rename = "clientCASecretName")]
    pub client_ca_secret_name: String,
    /// Secret with the replicas' client certificate for each other's internal API
    /// (`tls.crt`, `tls.key`, signed by the internal client CA) and the gateway's CA (`ca.crt`).
    pub peer_client_secret_name: String,
}

/// The BuildPlane controller.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerManager {
    /// Replicas (leader election picks one).
    pub replicas: u32,
    /// Image.
    pub image: Image,
    /// Health and metrics port.
    pub health_port: u16,
    /// How it reaches the gateway's internal API.
    pub cluster_gateway: ControllerGateway,
}

/// The controller's view of the gateway.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerGateway {
    /// Internal API URL.
    pub url: String,
    /// Secret with the client certificate (`tls.crt`, `tls.key`) and the gateway's CA (`ca.crt`).
    pub client_secret_name: String,
}

/// The default cluster agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterAgent {
    /// Deployment name.
    pub name: String,
    /// Replicas (several replicas serve one plane in HA).
    pub replicas: u32,
    /// Image.
    pub image: Image,
    /// The planeID (OpenChoreo's chart key is `planeID`, not `planeId`).
    #[serde(rename = "planeID")]
    pub plane_id: String,
    /// `buildplane`.
    pub plane_type: String,
    /// The plane CRs the agent serves (`--serve`, env `SERVE`): `<namespace>/<name>`,
    /// `<namespace>/*`, `_cluster/<name>`, `_cluster/*`. Empty: every CR that admits it.
    #[serde(default)]
    pub serve: Vec<String>,
    /// Gateway URL.
    pub server_url: String,
    /// `v2` or `v1`.
    pub protocol: String,
    /// Health port.
    pub health_port: u16,
    /// `--backoff-base`.
    pub backoff_base: String,
    /// `--backoff-cap`.
    pub backoff_cap: String,
    /// Certificates.
    pub tls: AgentTls,
}

/// The agent's certificates.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentTls {
    /// The Secret the agent writes its identity to (`cluster-agent-tls`).
    pub secret_name: String,
    /// The ConfigMap with the gateway's CA (`cluster-gateway-ca`, key `ca.crt`).
    #[serde(rename = "serverCAConfigMap")]
    pub server_ca_config_map: String,
}

/// The BuildPlane registered for the default agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// CR name.
    pub name: String,
    /// CR namespace.
    pub namespace: String,
}

impl Values {
    /// Parses and checks values.
    pub fn from_yaml(text: &str) -> Result<Values, K3dError> {
        let values: Values =
            serde_yaml::from_str(text).map_err(|source| K3dError::Values(source.to_string()))?;
        values.check()?;
        Ok(values)
    }

    /// Reads and checks a values file.
    pub fn load(path: &Path) -> Result<Values, K3dError> {
        let text = std::fs::read_to_string(path).map_err(|source| K3dError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        Values::from_yaml(&text)
            .map_err(|err| K3dError::Values(format!("{}: {err}", path.display())))
    }

    /// The committed defaults (`k3d/values.yaml`).
    pub fn committed(root: &Path) -> Result<Values, K3dError> {
        Values::load(&root.join("k3d/values.yaml"))
    }

    /// Checks what the types cannot: 1 to 16 gateway replicas, a valid planeID, distinct ports, and a
    /// server URL that goes through the published host port.
    pub fn check(&self) -> Result<(), K3dError> {
        let mut problems = Vec::new();
        if !(1..=16).contains(&self.cluster_gateway.replicas) {
            problems.push(format!(
                "clusterGateway.replicas is {}; it must be 1 to 16 (each agent holds a connection to every replica)",
                self.cluster_gateway.replicas
            ));
        }
        if let Err(err) =
            buildplane_api::validate_plane_id("clusterAgent.planeID", &self.cluster_agent.plane_id)
        {
            problems.push(err.to_string());
        }
        if self.clusters.control.name == self.clusters.build.name {
            problems.push("clusters.control.name and clusters.build.name are equal".into());
        }
        let ports = [
            ("clusters.control.apiPort", self.clusters.control.api_port),
            ("clusters.build.apiPort", self.clusters.build.api_port),
            ("clusterGateway.hostPort", self.cluster_gateway.host_port),
            (
                "clusterGateway.internalHostPort",
                self.cluster_gateway.internal_host_port,
            ),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            for (other, other_port) in &ports[i + 1..] {
                if port == other_port {
                    problems.push(format!("{name} and {other} are both {port}"));
                }
            }
        }
        let url = &self.cluster_agent.server_url;
        let through_host =
            url.contains(".openchoreo.localhost") || url.contains("host.k3d.internal");
        if through_host && !url.contains(&format!(":{}/", self.cluster_gateway.host_port)) {
            problems.push(format!(
                "clusterAgent.serverUrl {url} goes through the host but not to clusterGateway.hostPort {}",
                self.cluster_gateway.host_port
            ));
        }
        if !["v1", "v2"].contains(&self.cluster_agent.protocol.as_str()) {
            problems.push(format!(
                "clusterAgent.protocol is {:?}; use v1 or v2",
                self.cluster_agent.protocol
            ));
        }
        if !["IfNotPresent", "Never"].contains(&self.global.image_pull_policy.as_str()) {
            problems.push(format!(
                "global.imagePullPolicy is {:?}; images are imported with `k3d image import`, so use IfNotPresent or Never",
                self.global.image_pull_policy
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(K3dError::Values(problems.join("; ")))
        }
    }
}

/// The gateway's own default of `--plane-rate-request-bytes` (64 KiB a request).
fn default_plane_rate_request_bytes() -> u32 {
    64 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed() -> String {
        let root = crate::k3d::project_root();
        std::fs::read_to_string(root.join("k3d/values.yaml")).unwrap()
    }

    /// The committed values parse and pass the checks.
    #[test]
    fn committed_values_are_valid() {
        let values = Values::from_yaml(&committed()).unwrap();
        assert_eq!(values.cluster_agent.plane_id, "default");
        assert_eq!(values.clusters.control.context(), "k3d-buildplane-cp");
    }

    /// A misspelt key is an error, not a silently ignored value (fails if `deny_unknown_fields`
    /// is dropped).
    #[test]
    fn rejects_misspelt_keys() {
        let text = committed().replace("planeID: default", "planeId: default");
        let err = Values::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("planeId"), "{err}");
    }

    /// Each semantic check reports the offending key.
    #[test]
    fn rejects_values_the_layout_cannot_run() {
        let cases = [
            (
                "replicas: 3\n  image:\n    repository: buildplane/cluster-gateway",
                "replicas: 17\n  image:\n    repository: buildplane/cluster-gateway",
                "clusterGateway.replicas",
            ),
            (
                "planeID: default",
                "planeID: Default_1",
                "clusterAgent.planeID",
            ),
            ("apiPort: 6552", "apiPort: 6550", "apiPort"),
            (
                "localhost:38443/ws",
                "localhost:8443/ws",
                "clusterAgent.serverUrl",
            ),
            ("protocol: v2", "protocol: v3", "clusterAgent.protocol"),
            (
                "imagePullPolicy: IfNotPresent",
                "imagePullPolicy: Always",
                "global.imagePullPolicy",
            ),
        ];
        for (from, to, expected) in cases {
            let text = committed();
            assert!(text.contains(from), "fixture drifted: {from}");
            let err = Values::from_yaml(&text.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{to}: {err}");
        }
    }
}
