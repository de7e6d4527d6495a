//! The k3d deployment applied to two kube-sim API servers with the real `kubectl`: every rendered
//! manifest, the Secrets and the ConfigMap of the deploy plan, and the BuildPlane of the
//! registration workflow, run by the same executor `cargo xtask k3d deploy` uses.
//!
//! kube-sim validates custom resources against their CRD schemas (the BuildPlane) but stores
//! built-in kinds without a schema, so every built-in object is also checked field by field
//! against its k8s-openapi type (`k3d::structural`).

use std::path::{Path, PathBuf};

use buildplane_harness::k3d::config::Role;
use buildplane_harness::k3d::exec::{self, Executor, System};
use buildplane_harness::k3d::plan::{self, Cmd, Layout, Plan, StepKind};
use buildplane_harness::k3d::values::Values;
use buildplane_harness::k3d::{K3dError, project_root, render, structural};
use kube_sim::{Config, RunningServer, Server};

async fn start(name: &str) -> RunningServer {
    Server::start(Config {
        name: name.to_string(),
        ..Config::default()
    })
    .await
    .expect("kube-sim starts")
}

/// One kubeconfig holding both servers' clusters, users and contexts.
fn merged_kubeconfig(servers: &[&RunningServer]) -> String {
    let mut merged: serde_yaml::Value =
        serde_yaml::from_str(&servers[0].kubeconfig_yaml()).expect("kubeconfig YAML");
    for server in &servers[1..] {
        let other: serde_yaml::Value =
            serde_yaml::from_str(&server.kubeconfig_yaml()).expect("kubeconfig YAML");
        for key in ["clusters", "contexts", "users"] {
            let items = other[key].as_sequence().cloned().unwrap_or_default();
            merged[key]
                .as_sequence_mut()
                .expect("kube-sim writes lists")
                .extend(items);
        }
    }
    serde_yaml::to_string(&merged).expect("YAML serializes")
}

/// Runs a plan with the real executor from the repository root.
async fn execute(plan: Plan) -> Result<exec::Vars, K3dError> {
    tokio::task::spawn_blocking(move || {
        let mut system = System::new(&project_root());
        exec::execute(&plan, &mut system, &|line| eprintln!("{line}"))
    })
    .await
    .expect("the plan thread does not panic")
}

/// Runs one kubectl command and returns its stdout, failing the test with its stderr.
async fn kubectl(layout: &Layout, role: Role, args: &[&str]) -> String {
    let cmd = layout.kubectl(role, args.iter().copied());
    run(cmd).await
}

async fn run(cmd: Cmd) -> String {
    tokio::task::spawn_blocking(move || {
        let output = System::new(&project_root())
            .run(&cmd, None)
            .unwrap_or_else(|err| panic!("{} could not run: {err:?}", cmd.display()));
        assert!(
            output.success(),
            "{} failed: {}",
            cmd.display(),
            output.stderr
        );
        output.stdout
    })
    .await
    .expect("kubectl thread")
}

/// What k3s has and kube-sim lacks: the kube-system namespace and the coredns Deployment the
/// deploy plan restarts.
const K3S_BASICS: &str = r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}},
  {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", "namespace": "kube-system"},
   "spec": {"selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}},
                         "spec": {"containers": [{"name": "coredns", "image": "rancher/mirrored-coredns-coredns"}]}}}}
]}"#;

fn test_layout(dir: &Path, kubeconfig: PathBuf) -> Layout {
    let values = Values::committed(&project_root()).expect("committed values");
    let mut layout = Layout::new(values);
    layout.kubeconfig = kubeconfig;
    layout.pki_dir = dir.join("pki");
    layout
}

/// Every rendered manifest, Secret and ConfigMap of the deploy plan, and the registration's
/// BuildPlane (with a real CA read back from the build cluster), are accepted by kube-sim through
/// the real `kubectl`, and every object ends up where the manifests say.
/// (Fails if a manifest is invalid YAML, names an unknown kind or namespace, the BuildPlane
/// template violates the CRD schema, or a plan step's command line is wrong.)
#[tokio::test(flavor = "multi_thread")]
async fn deploy_plan_applies_to_kube_sim_with_real_kubectl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let values = Values::committed(&project_root()).expect("committed values");
    let control = start(&values.clusters.control.context()).await;
    let build = start(&values.clusters.build.context()).await;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, merged_kubeconfig(&[&control, &build])).expect("kubeconfig");
    let layout = test_layout(dir.path(), kubeconfig);

    let mut basics = layout.kubectl(Role::Build, ["apply", "--filename=-"]);
    basics.args.extend(["--validate=false".to_string()]);
    let basics_plan = Plan {
        name: "k3s basics".into(),
        steps: vec![plan::Step {
            about: "what k3s has".into(),
            kind: StepKind::Kubectl,
            action: plan::Action::Run {
                cmd: basics,
                stdin: Some(K3S_BASICS.to_string()),
            },
            unless: None,
            retry: None,
            show_output: false,
        }],
    };
    execute(basics_plan).await.expect("kube-system and coredns");

    // Everything of `deploy` that needs no Docker, no k3d and no running pods.
    let deploy = plan::manifests(&layout).without(&[StepKind::Wait]);
    assert!(deploy.steps.iter().any(|s| s.kind == StepKind::Local));
    execute(deploy).await.expect("the deploy plan applies");

    for file in render::manifests(&values) {
        for object in &file.objects {
            let kind = object["kind"].as_str().expect("kind");
            let name = object["metadata"]["name"].as_str().expect("name");
            let mut args = vec!["get".to_string(), format!("{kind}/{name}")];
            if let Some(namespace) = object["metadata"]["namespace"].as_str() {
                args.extend(["--namespace".to_string(), namespace.to_string()]);
            }
            args.push("--output=name".to_string());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kubectl(&layout, file.role, &args).await;
            assert!(!out.trim().is_empty(), "{kind}/{name} missing");
        }
    }
    let gateway_ca = kubectl(
        &layout,
        Role::Build,
        &[
            "get",
            "configmap",
            &values.cluster_agent.tls.server_ca_config_map,
            "--namespace",
            buildplane_api::names::AGENT_NAMESPACE,
            "--output=jsonpath={.data.ca\\.crt}",
        ],
    )
    .await;
    let server_ca = std::fs::read_to_string(layout.pki_dir.join("server-ca.crt")).expect("CA");
    assert_eq!(gateway_ca, server_ca, "the agents trust the gateway's CA");
    let tls_type = kubectl(
        &layout,
        Role::Control,
        &[
            "get",
            "secret",
            &values.cluster_gateway.tls.secret_name,
            "--namespace",
            "openchoreo-control-plane",
            "--output=jsonpath={.type}",
        ],
    )
    .await;
    assert_eq!(tls_type, "kubernetes.io/tls");

    // The registration workflow: the agent's Secret (written here as the agent would), then the
    // plan reads its CA and creates the BuildPlane on the control cluster.
    let agent_ca = buildplane_harness::pki::TestCa::generate("agent-ca")
        .expect("CA")
        .cert_pem;
    let ca_file = dir.path().join("agent-ca.crt");
    std::fs::write(&ca_file, &agent_ca).expect("CA file");
    run(layout.kubectl(
        Role::Build,
        [
            "create",
            "secret",
            "generic",
            values.cluster_agent.tls.secret_name.as_str(),
            "--namespace",
            buildplane_api::names::AGENT_NAMESPACE,
            &format!("--from-file=ca.crt={}", ca_file.display()),
        ],
    ))
    .await;
    let register = plan::register(&layout).without(&[StepKind::Wait]);
    let vars = execute(register).await.expect("the registration applies");
    assert_eq!(vars["AGENT_CA"], agent_ca);
    let stored = kubectl(
        &layout,
        Role::Control,
        &[
            "get",
            "buildplane",
            &values.registration.name,
            "--namespace",
            &values.registration.namespace,
            "--output=jsonpath={.spec.clusterAgent.clientCA.value}",
        ],
    )
    .await;
    assert_eq!(stored, agent_ca);
    control.shutdown().await;
    build.shutdown().await;
}

/// Every built-in object of the rendered manifests keeps all its fields through its
/// k8s-openapi type (kube-sim cannot catch a misspelt field of a built-in kind).
#[test]
fn rendered_objects_pass_the_structural_check() {
    let values = Values::committed(&project_root()).expect("committed values");
    let mut problems = Vec::new();
    for file in render::manifests(&values) {
        for object in &file.objects {
            if let Err(err) = structural::check(object) {
                problems.push(format!("{}: {err}", file.path().display()));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
