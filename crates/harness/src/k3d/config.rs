//! k3d `k3d.io/v1alpha5` Simple configs: the typed form we render, and a check of any config
//! file against k3d's schema.
//!
//! The types mirror `pkg/config/v1alpha5/schema.json` of k3d-io/k3d (MIT licence) field by
//! field: every object there has `additionalProperties: false`, which `deny_unknown_fields`
//! reproduces, and [`check`] adds the constraints serde cannot express (enums, minimums,
//! hostname and port formats, node filters). Only the fields this project might use are
//! optional here; fields of the schema we never write (`registries`, `hostAliases`,
//! `options.runtime`) are accepted as opaque values so a user's edited file still checks.

use serde::{Deserialize, Serialize};

use super::K3dError;
use super::values::{ClusterValues, Values};

/// `apiVersion` of the configs.
pub const API_VERSION: &str = "k3d.io/v1alpha5";
/// `kind` of the configs.
pub const KIND: &str = "Simple";

/// A k3d Simple config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimpleConfig {
    /// `k3d.io/v1alpha5`.
    pub api_version: String,
    /// `Simple`.
    pub kind: String,
    /// Cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Number of servers (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
    /// Number of agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<u32>,
    /// Kubernetes API exposure.
    #[serde(default, rename = "kubeAPI", skip_serializing_if = "Option::is_none")]
    pub kube_api: Option<KubeApi>,
    /// k3s image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Docker network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Subnet of the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// Cluster token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Volume mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeWithNodeFilters>,
    /// Manifests k3d installs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Manifest>,
    /// Port mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortWithNodeFilters>,
    /// k3d and k3s options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
    /// Environment variables of nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVarWithNodeFilters>,
    /// Registries (not used by this project; accepted as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<serde_yaml::Value>,
    /// Host aliases (not used by this project; accepted as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_aliases: Option<serde_yaml::Value>,
}

/// `metadata`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Cluster name (a hostname; k3d prefixes it with `k3d-`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `kubeAPI`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeApi {
    /// Host name in the kubeconfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Host IP to bind.
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Host port (a string in the schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<String>,
}

/// `volumes[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeWithNodeFilters {
    /// `SRC:DEST`.
    #[serde(default)]
    pub volume: Option<String>,
    /// Nodes.
    #[serde(default)]
    pub node_filters: Vec<String>,
}

/// `manifests[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Content.
    #[serde(default)]
    pub manifest: Option<String>,
}

/// `ports[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortWithNodeFilters {
    /// `[HOST:][HOSTPORT:]CONTAINERPORT[/PROTOCOL]`.
    pub port: String,
    /// Nodes (`loadbalancer`, `server:0`, ...).
    #[serde(default)]
    pub node_filters: Vec<String>,
}

/// `env[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVarWithNodeFilters {
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env_var: Option<String>,
    /// Nodes.
    #[serde(default)]
    pub node_filters: Vec<String>,
}

/// `options`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Options {
    /// `options.k3d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3d: Option<K3dOptions>,
    /// `options.k3s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sOptions>,
    /// `options.kubeconfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<KubeconfigOptions>,
    /// `options.runtime` (not used by this project; the schema leaves it open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<serde_yaml::Value>,
}

/// `options.k3d`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct K3dOptions {
    /// Wait for the nodes to be ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// How long to wait (`60s`, `1m30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// No load balancer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_loadbalancer: Option<bool>,
    /// No image volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_image_volume: Option<bool>,
    /// Keep a failed cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_rollback: Option<bool>,
    /// Load balancer overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadbalancer: Option<LoadbalancerOptions>,
}

/// `options.k3d.loadbalancer`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadbalancerOptions {
    /// `settings.workerConnections=2048`.
    #[serde(default)]
    pub config_overrides: Vec<String>,
}

/// `options.k3s`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct K3sOptions {
    /// Extra k3s arguments per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<ArgWithNodeFilters>,
    /// Node labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_labels: Vec<LabelWithNodeFilters>,
}

/// `options.k3s.extraArgs[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArgWithNodeFilters {
    /// The argument (`--disable=traefik`).
    pub arg: String,
    /// Nodes.
    #[serde(default)]
    pub node_filters: Vec<String>,
}

/// `options.k3s.nodeLabels[]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelWithNodeFilters {
    /// `key=value`.
    pub label: String,
    /// Nodes.
    #[serde(default)]
    pub node_filters: Vec<String>,
}

/// `options.kubeconfig`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeconfigOptions {
    /// Merge into `~/.kube/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_default_kubeconfig: Option<bool>,
    /// Switch the current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_current_context: Option<bool>,
}

/// Which of the two clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Gateway, controller, CRDs.
    Control,
    /// Agents.
    Build,
}

impl Role {
    /// `control` or `build`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Build => "build",
        }
    }

    /// The cluster's values.
    pub fn cluster(self, values: &Values) -> &ClusterValues {
        match self {
            Role::Control => &values.clusters.control,
            Role::Build => &values.clusters.build,
        }
    }
}

fn server_arg(arg: &str) -> ArgWithNodeFilters {
    ArgWithNodeFilters {
        arg: arg.to_string(),
        node_filters: vec!["server:*".to_string()],
    }
}

/// The Simple config of one cluster: one server, no agents, traefik disabled, `host.k3d.internal`
/// in the API server's certificate, distinct API ports; the control cluster publishes the
/// gateway's agent and internal ports on its load balancer.
pub fn simple_config(values: &Values, role: Role) -> SimpleConfig {
    let cluster = role.cluster(values);
    let ports = match role {
        Role::Control => [
            values.cluster_gateway.host_port,
            values.cluster_gateway.internal_host_port,
        ]
        .iter()
        .map(|port| PortWithNodeFilters {
            port: format!("{port}:{port}"),
            node_filters: vec!["loadbalancer".to_string()],
        })
        .collect(),
        Role::Build => Vec::new(),
    };
    SimpleConfig {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        metadata: Some(Metadata {
            name: Some(cluster.name.clone()),
        }),
        servers: Some(1),
        agents: Some(0),
        kube_api: Some(KubeApi {
            host: None,
            host_ip: Some("127.0.0.1".to_string()),
            host_port: Some(cluster.api_port.to_string()),
        }),
        image: Some(values.clusters.k3s_image.clone()),
        network: None,
        subnet: None,
        token: None,
        volumes: Vec::new(),
        manifests: Vec::new(),
        ports,
        options: Some(Options {
            k3d: Some(K3dOptions {
                wait: Some(true),
                timeout: Some("120s".to_string()),
                ..K3dOptions::default()
            }),
            k3s: Some(K3sOptions {
                extra_args: vec![
                    server_arg("--tls-san=host.k3d.internal"),
                    server_arg("--disable=traefik"),
                ],
                node_labels: Vec::new(),
            }),
            kubeconfig: Some(KubeconfigOptions {
                update_default_kubeconfig: Some(true),
                switch_current_context: Some(false),
            }),
            runtime: None,
        }),
        env: Vec::new(),
        registries: None,
        host_aliases: None,
    }
}

/// Renders a config as YAML with a header comment.
pub fn to_yaml(config: &SimpleConfig, role: Role) -> String {
    let body = serde_yaml::to_string(config).expect("a SimpleConfig always serializes");
    format!(
        "# k3d config of the {} cluster; generated from k3d/values.yaml by `cargo xtask k3d render`.\n\
         # Create it with `k3d cluster create --config k3d/clusters/{}.yaml` (or `cargo xtask k3d up`).\n{body}",
        role.as_str(),
        role.as_str()
    )
}

/// Parses a config file and checks it against k3d's v1alpha5 schema.
pub fn parse_and_check(text: &str) -> Result<SimpleConfig, K3dError> {
    let config: SimpleConfig =
        serde_yaml::from_str(text).map_err(|err| K3dError::K3dConfig(vec![err.to_string()]))?;
    check(&config)?;
    Ok(config)
}

/// The schema's constraints beyond field names and types.
pub fn check(config: &SimpleConfig) -> Result<(), K3dError> {
    let mut problems = Vec::new();
    if config.api_version != API_VERSION {
        problems.push(format!(
            "apiVersion: {:?} is not {API_VERSION:?}",
            config.api_version
        ));
    }
    if config.kind != KIND {
        problems.push(format!("kind: {:?} is not {KIND:?}", config.kind));
    }
    if let Some(name) = config.metadata.as_ref().and_then(|m| m.name.as_deref())
        && !is_hostname(name)
    {
        problems.push(format!("metadata.name: {name:?} is not a hostname"));
    }
    if config.servers == Some(0) {
        problems.push("servers: must be at least 1".to_string());
    }
    if let Some(api) = &config.kube_api {
        if let Some(host) = &api.host
            && !is_hostname(host)
        {
            problems.push(format!("kubeAPI.host: {host:?} is not a hostname"));
        }
        if let Some(ip) = &api.host_ip
            && ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            problems.push(format!("kubeAPI.hostIP: {ip:?} is not an IPv4 address"));
        }
        if let Some(port) = &api.host_port
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            problems.push(format!("kubeAPI.hostPort: {port:?} is not a port"));
        }
    }
    for (i, port) in config.ports.iter().enumerate() {
        if let Err(why) = check_port_mapping(&port.port) {
            problems.push(format!("ports[{i}].port: {:?} {why}", port.port));
        }
        for filter in &port.node_filters {
            if !is_node_filter(filter, true) {
                problems.push(format!(
                    "ports[{i}].nodeFilters: {filter:?} is not a node filter"
                ));
            }
        }
    }
    let mut filters: Vec<(String, &String)> = Vec::new();
    for (i, volume) in config.volumes.iter().enumerate() {
        filters.extend(
            volume
                .node_filters
                .iter()
                .map(|f| (format!("volumes[{i}]"), f)),
        );
    }
    for (i, env) in config.env.iter().enumerate() {
        filters.extend(env.node_filters.iter().map(|f| (format!("env[{i}]"), f)));
    }
    if let Some(k3s) = config.options.as_ref().and_then(|o| o.k3s.as_ref()) {
        for (i, arg) in k3s.extra_args.iter().enumerate() {
            if !arg.arg.starts_with("--") {
                problems.push(format!(
                    "options.k3s.extraArgs[{i}].arg: {:?} does not start with --",
                    arg.arg
                ));
            }
            filters.extend(
                arg.node_filters
                    .iter()
                    .map(|f| (format!("options.k3s.extraArgs[{i}]"), f)),
            );
        }
        for (i, label) in k3s.node_labels.iter().enumerate() {
            filters.extend(
                label
                    .node_filters
                    .iter()
                    .map(|f| (format!("options.k3s.nodeLabels[{i}]"), f)),
            );
        }
    }
    for (field, filter) in filters {
        if !is_node_filter(filter, false) {
            problems.push(format!(
                "{field}.nodeFilters: {filter:?} is not a node filter"
            ));
        }
    }
    if let Some(timeout) = config
        .options
        .as_ref()
        .and_then(|o| o.k3d.as_ref())
        .and_then(|k| k.timeout.as_ref())
        && timeout.parse::<crate::duration::Dur>().is_err()
    {
        problems.push(format!(
            "options.k3d.timeout: {timeout:?} is not a duration"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(K3dError::K3dConfig(problems))
    }
}

/// RFC 1123 hostname (the schema's `format: hostname`).
fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `loadbalancer`, `all`, `server:0`, `agent:*`, `server:0-2`, `server:1,2`; port filters may
/// add `:direct` or `:proxy`.
fn is_node_filter(filter: &str, port: bool) -> bool {
    let mut parts = filter.split(':');
    let role = parts.next().unwrap_or_default();
    let index = parts.next();
    let suffix = parts.next();
    if parts.next().is_some() {
        return false;
    }
    let suffix_ok = match suffix {
        None => true,
        Some("direct" | "proxy") => port,
        Some(_) => false,
    };
    let index_ok = |index: &str| {
        index == "*"
            || index.split(',').all(|item| {
                let mut bounds = item.splitn(2, '-');
                bounds.all(|b| !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()))
            })
    };
    match (role, index) {
        ("loadbalancer" | "all", None) => true,
        ("server" | "agent", Some(index)) => index_ok(index) && suffix_ok,
        _ => false,
    }
}

/// `[HOST:][HOSTPORT:]CONTAINERPORT[/PROTOCOL]`, ports possibly ranges.
fn check_port_mapping(mapping: &str) -> Result<(), &'static str> {
    let (ports, protocol) = match mapping.split_once('/') {
        Some((ports, protocol)) => (ports, Some(protocol)),
        None => (mapping, None),
    };
    if let Some(protocol) = protocol
        && !["tcp", "udp", "sctp"].contains(&protocol.to_ascii_lowercase().as_str())
    {
        return Err("has an unknown protocol");
    }
    let parts: Vec<&str> = ports.split(':').collect();
    let is_port = |p: &str| {
        p.splitn(2, '-')
            .all(|n| n.parse::<u16>().is_ok_and(|n| n > 0))
    };
    let ok = match parts.as_slice() {
        [container] => is_port(container),
        [host_port, container] => is_port(host_port) && is_port(container),
        [ip, host_port, container] => {
            ip.parse::<std::net::IpAddr>().is_ok()
                && (host_port.is_empty() || is_port(host_port))
                && is_port(container)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err("is not [HOST:][HOSTPORT:]CONTAINERPORT[/PROTOCOL]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values::committed(&crate::k3d::project_root()).unwrap()
    }

    /// Both rendered configs pass the schema check and keep OpenChoreo's layout.
    #[test]
    fn rendered_configs_follow_the_schema_and_the_layout() {
        let values = values();
        for role in [Role::Control, Role::Build] {
            let yaml = to_yaml(&simple_config(&values, role), role);
            let config = parse_and_check(&yaml).unwrap();
            let args: Vec<&str> = config
                .options
                .as_ref()
                .unwrap()
                .k3s
                .as_ref()
                .unwrap()
                .extra_args
                .iter()
                .map(|a| a.arg.as_str())
                .collect();
            assert!(args.contains(&"--tls-san=host.k3d.internal"));
            assert!(args.contains(&"--disable=traefik"));
        }
        let control = simple_config(&values, Role::Control);
        let build = simple_config(&values, Role::Build);
        assert_ne!(control.kube_api, build.kube_api, "API ports must differ");
        assert_eq!(control.kube_api.unwrap().host_port.as_deref(), Some("6550"));
        assert_eq!(build.kube_api.unwrap().host_port.as_deref(), Some("6552"));
    }

    /// Each kind of mistake k3d's schema rejects is rejected here too, naming the field.
    #[test]
    fn rejects_configs_that_violate_the_schema() {
        let values = values();
        let good = to_yaml(&simple_config(&values, Role::Control), Role::Control);
        let cases = [
            (
                "apiVersion: k3d.io/v1alpha5",
                "apiVersion: k3d.io/v1alpha4",
                "apiVersion",
            ),
            ("kind: Simple", "kind: Cluster", "kind"),
            (
                "name: buildplane-cp",
                "name: buildplane_cp",
                "metadata.name",
            ),
            ("servers: 1", "servers: 0", "servers"),
            ("hostPort: '6550'", "hostPort: '65536'", "kubeAPI.hostPort"),
            ("hostIP: 127.0.0.1", "hostIP: localhost", "kubeAPI.hostIP"),
            (
                "port: 38443:38443",
                "port: 38443:38443/http",
                "ports[0].port",
            ),
            ("- loadbalancer", "- lb", "ports[0].nodeFilters"),
            ("- server:*", "- server", "extraArgs[0].nodeFilters"),
            ("timeout: 120s", "timeout: soon", "options.k3d.timeout"),
            ("  k3s:\n", "  k3sOptions:\n", "unknown field"),
            ("servers: 1", "servers: 1\nserver: 1", "unknown field"),
        ];
        for (from, to, field) in cases {
            assert!(
                good.contains(from),
                "fixture drifted: {from:?} not in\n{good}"
            );
            let bad = good.replacen(from, to, 1);
            let err = parse_and_check(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{to:?} should fail on {field}: {err}");
        }
    }

    /// The node-filter and port-mapping grammars accept what k3d's docs show.
    #[test]
    fn accepts_documented_node_filters_and_ports() {
        for filter in [
            "loadbalancer",
            "all",
            "server:0",
            "agent:*",
            "agent:0-2",
            "server:0,1",
        ] {
            assert!(is_node_filter(filter, false), "{filter}");
        }
        assert!(is_node_filter("server:0:direct", true));
        assert!(!is_node_filter("server:0:direct", false));
        for port in [
            "8080:80",
            "80",
            "127.0.0.1:8080:80",
            "0.0.0.0:8080:80/tcp",
            "30000-30010:30000-30010",
        ] {
            assert!(check_port_mapping(port).is_ok(), "{port}");
        }
    }
}
