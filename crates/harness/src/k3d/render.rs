//! Renders the k3d layout from [`Values`]: the two k3d configs and the manifests of each cluster
//! (namespaces, least-privilege RBAC, Deployments, Services, the CoreDNS rewrite).
//!
//! Certificates are not rendered: `cargo xtask k3d deploy` generates them and creates the
//! Secrets and the `cluster-gateway-ca` ConfigMap with `kubectl create ... --dry-run=client`
//! (see [`super::plan`]), so no key material is committed.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::K3dError;
use super::config::{self, Role};
use super::values::{
    CONTROL_NAMESPACE, CONTROLLER_NAME, GATEWAY_EXTERNAL_NAME, GATEWAY_NAME, Image, Values,
};
use buildplane_api::names;

/// One rendered file.
#[derive(Clone, Debug)]
pub struct RenderedFile {
    /// Path relative to the repository root.
    pub path: PathBuf,
    /// Content.
    pub text: String,
}

/// A manifest file: its cluster, its name and its objects.
#[derive(Clone, Debug)]
pub struct ManifestFile {
    /// Cluster it is applied to.
    pub role: Role,
    /// File name under `k3d/manifests/<role>/`.
    pub name: &'static str,
    /// What it holds (the header comment).
    pub about: &'static str,
    /// Objects in order.
    pub objects: Vec<Value>,
}

impl ManifestFile {
    /// Path relative to the repository root.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("k3d/manifests")
            .join(self.role.as_str())
            .join(self.name)
    }

    /// Multi-document YAML with a header.
    pub fn to_yaml(&self) -> String {
        let mut text = format!(
            "# {}\n# Generated from k3d/values.yaml by `cargo xtask k3d render`; do not edit.\n",
            self.about
        );
        for object in &self.objects {
            text.push_str("---\n");
            text.push_str(&serde_yaml::to_string(object).expect("JSON values serialize to YAML"));
        }
        text
    }
}

/// Labels of a component's objects.
fn labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "openchoreo-buildplane",
        "app.kubernetes.io/managed-by": "buildplane-xtask",
    })
}

fn selector(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component})
}

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "openchoreo-buildplane"}},
    })
}

fn service_account(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
    })
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn cluster_role(name: &str, component: &str, rules: Vec<Value>) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels(component)},
        "rules": rules,
    })
}

fn role(name: &str, namespace: &str, component: &str, rules: Vec<Value>) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(component)},
        "rules": rules,
    })
}

fn binding(
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    component: &str,
    sa: (&str, &str),
) -> Value {
    let mut metadata = json!({"name": name, "labels": labels(component)});
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    let role_kind = if kind == "ClusterRoleBinding" {
        "ClusterRole"
    } else {
        "Role"
    };
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa.0, "namespace": sa.1}],
    })
}

/// The parts of a container that differ between components.
struct ContainerSpec<'a> {
    name: &'a str,
    image: &'a Image,
    pull_policy: &'a str,
    args: Vec<String>,
    env: Vec<Value>,
    ports: Vec<Value>,
    health_port: u16,
    mounts: Vec<Value>,
}

/// A hardened container: non-root, read-only root file system, no capabilities.
fn container(spec: ContainerSpec<'_>) -> Value {
    json!({
        "name": spec.name,
        "image": spec.image.to_string(),
        "imagePullPolicy": spec.pull_policy,
        "args": spec.args,
        "env": spec.env,
        "ports": spec.ports,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": spec.health_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": spec.health_port},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": spec.mounts,
    })
}

fn env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn pod_name_env() -> Value {
    json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
}

fn port(name: &str, port: u16) -> Value {
    json!({"name": name, "containerPort": port, "protocol": "TCP"})
}

fn mount(name: &str, path: &str) -> Value {
    json!({"name": name, "mountPath": path, "readOnly": true})
}

fn deployment(
    name: &str,
    namespace: &str,
    replicas: u32,
    service_account: &str,
    container: Value,
    volumes: Vec<Value>,
    strategy: Value,
) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name)},
            "strategy": strategy,
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "serviceAccountName": service_account,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    })
}

fn control_rbac() -> Vec<Value> {
    let ns = CONTROL_NAMESPACE;
    let read = ["get", "list", "watch"];
    vec![
        service_account(GATEWAY_NAME, ns),
        // The gateway resolves each BuildPlane's client CA, inline or from a Secret anywhere.
        cluster_role(
            GATEWAY_NAME,
            GATEWAY_NAME,
            vec![
                rule(
                    &[names::GROUP],
                    &["buildplanes", "clusterbuildplanes"],
                    &read,
                ),
                rule(&[""], &["secrets"], &read),
            ],
        ),
        binding(
            "ClusterRoleBinding",
            GATEWAY_NAME,
            None,
            GATEWAY_NAME,
            (GATEWAY_NAME, ns),
        ),
        // Its sibling replicas are the endpoints of its own Service (`--peer-service`): read
        // in its namespace only.
        role(
            &format!("{GATEWAY_NAME}-peers"),
            ns,
            GATEWAY_NAME,
            vec![rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["list", "watch"],
            )],
        ),
        binding(
            "RoleBinding",
            &format!("{GATEWAY_NAME}-peers"),
            Some(ns),
            GATEWAY_NAME,
            (GATEWAY_NAME, ns),
        ),
        service_account(CONTROLLER_NAME, ns),
        cluster_role(
            CONTROLLER_NAME,
            CONTROLLER_NAME,
            vec![
                rule(
                    &[names::GROUP],
                    &["buildplanes", "clusterbuildplanes"],
                    &["get", "list", "watch", "update", "patch"],
                ),
                rule(
                    &[names::GROUP],
                    &["buildplanes/status", "clusterbuildplanes/status"],
                    &["get", "update", "patch"],
                ),
                rule(
                    &[names::GROUP],
                    &["buildplanes/finalizers", "clusterbuildplanes/finalizers"],
                    &["update"],
                ),
                // Watched so a changed CA Secret is picked up (OpenChoreo does not watch them).
                rule(&[""], &["secrets"], &read),
                rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
            ],
        ),
        binding(
            "ClusterRoleBinding",
            CONTROLLER_NAME,
            None,
            CONTROLLER_NAME,
            (CONTROLLER_NAME, ns),
        ),
        // Leader election only in its own namespace.
        role(
            &format!("{CONTROLLER_NAME}-leader-election"),
            ns,
            CONTROLLER_NAME,
            vec![rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "list", "watch", "create", "update", "patch"],
            )],
        ),
        binding(
            "RoleBinding",
            &format!("{CONTROLLER_NAME}-leader-election"),
            Some(ns),
            CONTROLLER_NAME,
            (CONTROLLER_NAME, ns),
        ),
    ]
}

/// The gateway's Deployment and Services; `extra_args` are appended to its flags.
pub fn gateway(values: &Values, extra_args: &[String]) -> Vec<Value> {
    let gw = &values.cluster_gateway;
    let mut args = vec![
        format!("--agent-listen=0.0.0.0:{}", gw.port),
        format!("--internal-listen=0.0.0.0:{}", gw.internal_port),
        format!("--health-listen=0.0.0.0:{}", gw.health_port),
        "--server-cert=/certs/tls.crt".to_string(),
        "--server-key=/certs/tls.key".to_string(),
        "--internal-client-ca=/internal-ca/ca.crt".to_string(),
        format!("--heartbeat-interval={}", gw.heartbeat_interval),
        format!("--heartbeat-timeout={}", gw.heartbeat_timeout),
        format!(
            "--max-concurrent-handshakes={}",
            gw.max_concurrent_handshakes
        ),
        format!(
            "--max-connections-per-identity={}",
            gw.max_connections_per_identity
        ),
        // Out of the Service's endpoints before the drain begins.
        "--shutdown-delay=5s".to_string(),
        // A request no connection of a replica can take (a partition between it and the
        // agents) goes to a sibling, found in the Service's EndpointSlices.
        format!("--peer-service={CONTROL_NAMESPACE}/{GATEWAY_NAME}"),
        "--peer-client-cert=/peer-client/tls.crt".to_string(),
        "--peer-client-key=/peer-client/tls.key".to_string(),
        "--peer-ca=/peer-client/ca.crt".to_string(),
    ];
    if gw.plane_rate_limit > 0 {
        args.push(format!("--plane-rate-limit={}", gw.plane_rate_limit));
        if gw.plane_rate_burst > 0 {
            args.push(format!("--plane-rate-burst={}", gw.plane_rate_burst));
        }
        args.push(format!(
            "--plane-rate-request-bytes={}",
            gw.plane_rate_request_bytes
        ));
    }
    args.extend(extra_args.iter().cloned());
    let container = container(ContainerSpec {
        name: GATEWAY_NAME,
        image: &gw.image,
        pull_policy: &values.global.image_pull_policy,
        args,
        env: vec![
            env("RUST_LOG", "info"),
            env("NO_COLOR", "1"),
            // The replica's id (its pod name) and the replica count, told to agents.
            pod_name_env(),
            env("GATEWAY_REPLICAS", &gw.replicas.to_string()),
        ],
        ports: vec![
            port("agent", gw.port),
            port("internal", gw.internal_port),
            port("health", gw.health_port),
        ],
        health_port: gw.health_port,
        mounts: vec![
            mount("tls", "/certs"),
            mount("internal-ca", "/internal-ca"),
            mount("peer-client", "/peer-client"),
        ],
    });
    let volumes = vec![
        json!({"name": "tls", "secret": {"secretName": gw.tls.secret_name}}),
        json!({"name": "internal-ca", "secret": {"secretName": gw.internal_tls.client_ca_secret_name}}),
        json!({"name": "peer-client", "secret": {"secretName": gw.internal_tls.peer_client_secret_name}}),
    ];
    // One replica at a time, never more than `replicas` (the count the agents are told): the
    // agents of the replaced pod reach the new one while the others serve.
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}});
    let service_port = |name: &str, port: u16, target: u16| json!({"name": name, "port": port, "targetPort": target, "protocol": "TCP"});
    let mut deployment = deployment(
        GATEWAY_NAME,
        CONTROL_NAMESPACE,
        gw.replicas,
        GATEWAY_NAME,
        container,
        volumes,
        strategy,
    );
    let pod = &mut deployment["spec"]["template"]["spec"];
    // The drain: `--shutdown-delay`, then up to `--drain-timeout` (30 s) for requests in flight.
    pod["terminationGracePeriodSeconds"] = json!(45);
    // Replicas on different nodes where there are several (preferred: one node still runs all).
    pod["affinity"] = json!({
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector(GATEWAY_NAME)},
                },
            }],
        },
    });
    let mut objects = vec![deployment];
    if gw.replicas > 1 {
        objects.push(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": GATEWAY_NAME, "namespace": CONTROL_NAMESPACE, "labels": labels(GATEWAY_NAME)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(GATEWAY_NAME)}},
        }));
    }
    objects.extend([
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": GATEWAY_NAME, "namespace": CONTROL_NAMESPACE, "labels": labels(GATEWAY_NAME)},
            "spec": {
                "type": "ClusterIP",
                "selector": selector(GATEWAY_NAME),
                "ports": [
                    service_port("agent", gw.port, gw.port),
                    service_port("internal", gw.internal_port, gw.internal_port),
                    service_port("health", gw.health_port, gw.health_port),
                ],
            },
        }),
        // k3s's service load balancer binds these ports on the node; k3d's load balancer
        // publishes them on the host (k3d/clusters/control.yaml), where agents of the build
        // cluster reach them through host.k3d.internal.
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": GATEWAY_EXTERNAL_NAME, "namespace": CONTROL_NAMESPACE, "labels": labels(GATEWAY_NAME)},
            "spec": {
                "type": "LoadBalancer",
                "selector": selector(GATEWAY_NAME),
                "ports": [
                    service_port("agent", gw.host_port, gw.port),
                    service_port("internal", gw.internal_host_port, gw.internal_port),
                ],
            },
        }),
    ]);
    objects
}

/// The controller's Deployment; `extra_args` are appended to its flags.
pub fn controller(values: &Values, extra_args: &[String]) -> Vec<Value> {
    let cm = &values.controller_manager;
    let mut args = vec![
        format!("--cluster-gateway-url={}", cm.cluster_gateway.url),
        "--gateway-client-cert=/gateway-client/tls.crt".to_string(),
        "--gateway-client-key=/gateway-client/tls.key".to_string(),
        "--gateway-ca=/gateway-client/ca.crt".to_string(),
        format!("--health-listen=0.0.0.0:{}", cm.health_port),
        format!("--leader-election-namespace={CONTROL_NAMESPACE}"),
    ];
    args.extend(extra_args.iter().cloned());
    let container = container(ContainerSpec {
        name: CONTROLLER_NAME,
        image: &cm.image,
        pull_policy: &values.global.image_pull_policy,
        args,
        env: vec![
            env("RUST_LOG", "info"),
            env("NO_COLOR", "1"),
            pod_name_env(),
        ],
        ports: vec![port("health", cm.health_port)],
        health_port: cm.health_port,
        mounts: vec![mount("gateway-client", "/gateway-client")],
    });
    let volumes = vec![json!({
        "name": "gateway-client",
        "secret": {"secretName": cm.cluster_gateway.client_secret_name},
    })];
    vec![deployment(
        CONTROLLER_NAME,
        CONTROL_NAMESPACE,
        cm.replicas,
        CONTROLLER_NAME,
        container,
        volumes,
        json!({"type": "RollingUpdate"}),
    )]
}

/// The rules of the agent's ClusterRole: what the control plane asks of a build plane through
/// the tunnel (OpenChoreo's WorkflowRun controller), with explicit verbs instead of `*`.
fn agent_cluster_rules() -> Vec<Value> {
    let write = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let read = ["get", "list", "watch"];
    vec![
        // The agent creates its own namespace; workflow runs create `openchoreo-ci-*` ones.
        rule(&[""], &["namespaces"], &["get", "list", "watch", "create"]),
        rule(
            &[""],
            &[
                "pods",
                "services",
                "configmaps",
                "serviceaccounts",
                "persistentvolumeclaims",
                "endpoints",
            ],
            &write,
        ),
        rule(
            &["apps"],
            &["deployments", "statefulsets", "daemonsets", "replicasets"],
            &write,
        ),
        rule(&["batch"], &["jobs", "cronjobs"], &write),
        // Workflow runs bind a Role for their service account (argoproj workflowtaskresults).
        rule(
            &["rbac.authorization.k8s.io"],
            &["roles", "rolebindings"],
            &write,
        ),
        rule(
            &["argoproj.io"],
            &[
                "workflows",
                "workflowtemplates",
                "cronworkflows",
                "clusterworkflowtemplates",
                "workflowtaskresults",
            ],
            &write,
        ),
        // Logs and events are read-only.
        rule(&[""], &["pods/log"], &["get"]),
        rule(&["", "events.k8s.io"], &["events"], &read),
    ]
}

fn agent_rbac(values: &Values) -> Vec<Value> {
    let name = &values.cluster_agent.name;
    let ns = names::AGENT_NAMESPACE;
    vec![
        service_account(name, ns),
        cluster_role(name, name, agent_cluster_rules()),
        binding("ClusterRoleBinding", name, None, name, (name, ns)),
        // Secrets only in the agent's namespace: its identity (cluster-agent-tls, cluster-agent-ca).
        role(
            &format!("{name}-identity"),
            ns,
            name,
            vec![rule(
                &[""],
                &["secrets"],
                &["get", "list", "watch", "create", "update", "patch"],
            )],
        ),
        binding(
            "RoleBinding",
            &format!("{name}-identity"),
            Some(ns),
            name,
            (name, ns),
        ),
    ]
}

/// The agent Deployment (also used for agents a scenario starts, with another name and planeID).
pub fn agent_deployment(values: &Values, spec: &AgentDeployment) -> Value {
    let agent = &values.cluster_agent;
    let mut args = match &spec.swarm {
        None => vec![
            "run".to_string(),
            format!("--health-listen=0.0.0.0:{}", agent.health_port),
        ],
        Some(swarm) => vec![
            "swarm".to_string(),
            format!("--count={}", swarm.count),
            format!("--plane-id-prefix={}", swarm.plane_id_prefix),
            format!("--ca-out={SWARM_CA_PATH}"),
        ],
    };
    args.extend([
        format!("--identity-namespace={}", spec.identity_namespace),
        format!("--protocol={}", spec.protocol),
        format!("--backoff-base={}", agent.backoff_base),
        format!("--backoff-cap={}", agent.backoff_cap),
    ]);
    args.extend(spec.extra_args.iter().cloned());
    // A swarm has no single planeID and no health listener.
    let is_swarm = spec.swarm.is_some();
    let mut agent_env = vec![
        env("SERVER_URL", &agent.server_url),
        env("PLANE_ID", &spec.plane_id),
        env("PLANE_TYPE", &agent.plane_type),
        env("SERVER_CA", "/ca-certs/ca.crt"),
        env("RUST_LOG", "info"),
        env("NO_COLOR", "1"),
        pod_name_env(),
    ];
    if !agent.serve.is_empty() && !is_swarm {
        agent_env.push(env("SERVE", &agent.serve.join(",")));
    }
    let container = container(ContainerSpec {
        name: "cluster-agent",
        image: &agent.image,
        pull_policy: &values.global.image_pull_policy,
        args,
        env: agent_env,
        ports: vec![port("health", agent.health_port)],
        health_port: agent.health_port,
        mounts: vec![
            mount("server-ca", "/ca-certs"),
            json!({"name": "tmp", "mountPath": "/tmp"}),
        ],
    });
    let volumes = vec![
        json!({"name": "server-ca", "configMap": {"name": agent.tls.server_ca_config_map}}),
        json!({"name": "tmp", "emptyDir": {}}),
    ];
    let mut object = deployment(
        &spec.name,
        names::AGENT_NAMESPACE,
        spec.replicas,
        &agent.name,
        container,
        volumes,
        json!({"type": "RollingUpdate"}),
    );
    if is_swarm {
        let container = &mut object["spec"]["template"]["spec"]["containers"][0];
        let fields = container.as_object_mut().expect("a container is an object");
        fields.remove("readinessProbe");
        fields.remove("livenessProbe");
        fields.remove("ports");
        fields.insert(
            "env".into(),
            json!(
                fields["env"]
                    .as_array()
                    .expect("env is a list")
                    .iter()
                    .filter(|e| e["name"] != "PLANE_ID")
                    .cloned()
                    .collect::<Vec<_>>()
            ),
        );
    }
    for (key, value) in &spec.labels {
        object["metadata"]["labels"][key.as_str()] = json!(value);
        object["spec"]["template"]["metadata"]["labels"][key.as_str()] = json!(value);
    }
    object
}

/// Where a swarm writes its CA inside the container.
pub const SWARM_CA_PATH: &str = "/tmp/swarm-ca.pem";

/// A swarm: N agents in one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmProcess {
    /// Agents.
    pub count: u64,
    /// planeIDs are `PREFIX-0..PREFIX-(count-1)`.
    pub plane_id_prefix: String,
}

/// What distinguishes one agent Deployment from another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentDeployment {
    /// Deployment name.
    pub name: String,
    /// planeID.
    pub plane_id: String,
    /// Namespace of its identity Secrets.
    pub identity_namespace: String,
    /// `v1` or `v2`.
    pub protocol: String,
    /// Replicas.
    pub replicas: u32,
    /// Extra flags of `cluster-agent run` (or `swarm`).
    pub extra_args: Vec<String>,
    /// Extra labels (on the Deployment and its pods).
    pub labels: Vec<(String, String)>,
    /// Run a swarm instead of one agent.
    pub swarm: Option<SwarmProcess>,
}

impl AgentDeployment {
    /// The default agent of the values.
    pub fn default_agent(values: &Values) -> AgentDeployment {
        AgentDeployment {
            name: values.cluster_agent.name.clone(),
            plane_id: values.cluster_agent.plane_id.clone(),
            identity_namespace: names::AGENT_NAMESPACE.to_string(),
            protocol: values.cluster_agent.protocol.clone(),
            replicas: values.cluster_agent.replicas,
            extra_args: Vec::new(),
            labels: Vec::new(),
            swarm: None,
        }
    }
}

/// The CoreDNS rewrite of `*.openchoreo.localhost` to `host.k3d.internal` (which k3d adds to
/// CoreDNS's NodeHosts), imported by k3s's Corefile from the `coredns-custom` ConfigMap.
pub fn coredns_custom() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "coredns-custom", "namespace": "kube-system", "labels": labels("coredns-custom")},
        "data": {
            "openchoreo-localhost.override": "rewrite stop {\n  name regex (.*)\\.openchoreo\\.localhost host.k3d.internal\n  answer auto\n}\n",
        },
    })
}

/// Every manifest file, in apply order within each cluster.
pub fn manifests(values: &Values) -> Vec<ManifestFile> {
    vec![
        ManifestFile {
            role: Role::Control,
            name: "00-namespace.yaml",
            about: "Namespace of the gateway and the controller (control cluster).",
            objects: vec![namespace(CONTROL_NAMESPACE)],
        },
        ManifestFile {
            role: Role::Control,
            name: "10-rbac.yaml",
            about: "Least-privilege RBAC of the gateway and the controller (control cluster).",
            objects: control_rbac(),
        },
        ManifestFile {
            role: Role::Control,
            name: "20-cluster-gateway.yaml",
            about: "The cluster gateway: Deployment (replicas, each agent connected to all), PodDisruptionBudget, in-cluster Service, host-published Service.",
            objects: gateway(values, &[]),
        },
        ManifestFile {
            role: Role::Control,
            name: "30-buildplane-controller.yaml",
            about: "The BuildPlane controller (leader-elected).",
            objects: controller(values, &[]),
        },
        ManifestFile {
            role: Role::Build,
            name: "00-namespace.yaml",
            about: "Namespace of the cluster agent and its identity Secrets (build cluster).",
            objects: vec![namespace(names::AGENT_NAMESPACE)],
        },
        ManifestFile {
            role: Role::Build,
            name: "05-coredns-custom.yaml",
            about: "CoreDNS rewrite of *.openchoreo.localhost to host.k3d.internal (OpenChoreo's cross-cluster path).",
            objects: vec![coredns_custom()],
        },
        ManifestFile {
            role: Role::Build,
            name: "10-rbac.yaml",
            about: "The cluster agent's RBAC: build-plane workloads and Argo Workflows cluster-wide, Secrets only in its namespace.",
            objects: agent_rbac(values),
        },
        ManifestFile {
            role: Role::Build,
            name: "20-cluster-agent.yaml",
            about: "The default cluster agent (clusterAgent.* values).",
            objects: vec![agent_deployment(
                values,
                &AgentDeployment::default_agent(values),
            )],
        },
    ]
}

/// The BuildPlane the registration step applies, with `${AGENT_CA}` where the agent's CA goes.
pub fn buildplane_template(values: &Values) -> String {
    format!(
        "apiVersion: {api}\nkind: BuildPlane\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  planeID: {plane_id}\n  clusterAgent:\n    clientCA:\n      value: ${{AGENT_CA}}\n",
        api = names::API_VERSION,
        name = values.registration.name,
        namespace = values.registration.namespace,
        plane_id = values.cluster_agent.plane_id,
    )
}

/// Every generated file of `k3d/` (configs and manifests).
pub fn all_files(values: &Values) -> Vec<RenderedFile> {
    let mut files = Vec::new();
    for role in [Role::Control, Role::Build] {
        files.push(RenderedFile {
            path: PathBuf::from(format!("k3d/clusters/{}.yaml", role.as_str())),
            text: config::to_yaml(&config::simple_config(values, role), role),
        });
    }
    files.extend(manifests(values).iter().map(|file| RenderedFile {
        path: file.path(),
        text: file.to_yaml(),
    }));
    files
}

/// Writes every generated file under `root`.
pub fn write_all(root: &Path, values: &Values) -> Result<Vec<PathBuf>, K3dError> {
    let mut written = Vec::new();
    for file in all_files(values) {
        let path = root.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| K3dError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        std::fs::write(&path, &file.text).map_err(|source| K3dError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        written.push(file.path);
    }
    Ok(written)
}

/// The generated files whose committed copy differs from what the values render.
pub fn stale_files(root: &Path, values: &Values) -> Vec<PathBuf> {
    all_files(values)
        .into_iter()
        .filter(|file| {
            std::fs::read_to_string(root.join(&file.path))
                .ok()
                .as_deref()
                != Some(&file.text)
        })
        .map(|file| file.path)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values::committed(&crate::k3d::project_root()).unwrap()
    }

    /// Every rendered file matches its snapshot (review changes with `cargo insta review`).
    #[test]
    fn rendered_files_match_snapshots() {
        for file in all_files(&values()) {
            let name = file.path.display().to_string().replace(['/', '.'], "_");
            insta::assert_snapshot!(name, file.text);
        }
    }

    /// The committed k3d/ files are what the committed values render (fails after an edit of
    /// values.yaml or of this renderer until `cargo xtask k3d render` is run).
    #[test]
    fn committed_files_are_current() {
        let root = crate::k3d::project_root();
        let stale = stale_files(&root, &values());
        assert!(
            stale.is_empty(),
            "stale: {stale:?}; run `cargo xtask k3d render`"
        );
    }

    /// `planeRateLimit` reaches the gateway's arguments when set, with `planeRateBurst` (when
    /// set) and `planeRateRequestBytes`, and nothing of them when the limit is 0.
    #[test]
    fn plane_rate_limit_is_a_gateway_flag_when_set() {
        let args = |values: &Values| {
            let deployment = gateway(values, &[])
                .into_iter()
                .find(|o| o["kind"] == "Deployment")
                .unwrap();
            deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string()
        };
        let mut values = values();
        assert!(!args(&values).contains("--plane-rate"));
        values.cluster_gateway.plane_rate_limit = 50;
        assert!(args(&values).contains("\"--plane-rate-limit=50\""));
        assert!(!args(&values).contains("--plane-rate-burst"));
        assert!(args(&values).contains("\"--plane-rate-request-bytes=65536\""));
        values.cluster_gateway.plane_rate_burst = 200;
        values.cluster_gateway.plane_rate_request_bytes = 0;
        assert!(args(&values).contains("\"--plane-rate-burst=200\""));
        assert!(args(&values).contains("\"--plane-rate-request-bytes=0\""));
    }

    /// The gateway may only read BuildPlanes and Secrets: no write verb anywhere in its role.
    #[test]
    fn gateway_role_is_read_only() {
        let objects = control_rbac();
        let role = objects
            .iter()
            .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == GATEWAY_NAME)
            .unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str().unwrap()),
                    "{rule}"
                );
            }
        }
    }

    /// No role grants `*`, and the agent's cluster-wide role grants nothing on Secrets.
    #[test]
    fn roles_are_least_privilege() {
        let values = values();
        let mut objects = control_rbac();
        objects.extend(agent_rbac(&values));
        for object in &objects {
            for rule in object["rules"].as_array().into_iter().flatten() {
                let text = rule.to_string();
                assert!(
                    !text.contains("\"*\""),
                    "wildcard in {}: {text}",
                    object["metadata"]["name"]
                );
                if object["kind"] == "ClusterRole"
                    && object["metadata"]["name"] == values.cluster_agent.name
                {
                    assert!(
                        !text.contains("\"secrets\""),
                        "agent ClusterRole grants secrets: {text}"
                    );
                }
            }
        }
    }

    /// The BuildPlane template is valid YAML once the CA is substituted as a quoted string.
    #[test]
    fn buildplane_template_takes_a_multiline_ca() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let text = buildplane_template(&values())
            .replace("${AGENT_CA}", &serde_json::to_string(ca).unwrap());
        let value: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(value["spec"]["clusterAgent"]["clientCA"]["value"], ca);
        assert_eq!(value["spec"]["planeID"], "default");
    }
}
