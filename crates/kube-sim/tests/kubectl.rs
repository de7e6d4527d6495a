//! The real `kubectl` against kube-sim: the seed's registration commands, printer columns,
//! validation messages, patches, waits and server-side apply.

use std::{path::Path, process::Output};

use kube_sim::{Config, RunningServer, Server};
use tempfile::TempDir;

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

struct Cluster {
    server: RunningServer,
    dir: TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let server = Server::start(Config::default())
            .await
            .expect("kube-sim starts");
        let dir = tempfile::tempdir().expect("temp dir");
        server
            .write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig written");
        Self { server, dir }
    }

    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt as _;
        let mut command = tokio::process::Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .args(args)
            .current_dir(repo_root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("kubectl is installed");
        let mut input = child.stdin.take().expect("stdin piped");
        if let Some(text) = stdin {
            input
                .write_all(text.as_bytes())
                .await
                .expect("stdin written");
        }
        drop(input);
        child.wait_with_output().await.expect("kubectl ran")
    }

    /// Runs kubectl and returns stdout, failing the test with stderr when it fails.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args, None).await;
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The seed's registration workflow and day-to-day kubectl commands work unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_registration_workflow() {
    let cluster = Cluster::start().await;
    cluster.ok(&["apply", "-f", "k3d/manifests/crds/"]).await;
    cluster.ok(&["create", "namespace", "my-org"]).await;
    let ca = cluster.dir.path().join("buildplane-ca.crt");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    cluster
        .ok(&[
            "create",
            "secret",
            "generic",
            "buildplane-agent-ca",
            &format!("--from-file=ca.crt={}", ca.display()),
            "-n",
            "my-org",
        ])
        .await;
    let extracted = cluster
        .ok(&[
            "get",
            "secret",
            "buildplane-agent-ca",
            "-n",
            "my-org",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])
        .await;
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(extracted.trim())
        .expect("base64");
    assert_eq!(decoded, std::fs::read(&ca).expect("read"));

    cluster
        .ok(&[
            "apply",
            "-f",
            "crates/api/test_data/seed/option2-secret-ref.yaml",
        ])
        .await;
    cluster
        .ok(&[
            "apply",
            "-f",
            "crates/api/test_data/seed/option1-inline-value.yaml",
        ])
        .await;
    cluster
        .ok(&[
            "patch",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"agentConnection":{"connected":true,"connectedAgents":2}}}"#,
        ])
        .await;
    cluster
        .ok(&[
            "wait",
            "--for=jsonpath={.status.agentConnection.connected}=true",
            "buildplane/my-buildplane",
            "-n",
            "my-org",
            "--timeout=10s",
        ])
        .await;
    let table = cluster.ok(&["get", "buildplanes", "-n", "my-org"]).await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PLANEID", "CONNECTED", "AGENTS", "READY", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..4],
        ["my-buildplane", "default-buildplane", "true", "2"],
        "{table}"
    );

    // A spec change bumps the generation; the status write before it did not.
    let generation = cluster
        .ok(&[
            "get",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "-o",
            "jsonpath={.metadata.generation}",
        ])
        .await;
    assert_eq!(generation, "2", "option 1 re-applied a new spec once");
    cluster
        .ok(&[
            "patch",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"planeID":"ci"}}"#,
        ])
        .await;
    let generation = cluster
        .ok(&[
            "get",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "-o",
            "jsonpath={.metadata.generation}",
        ])
        .await;
    assert_eq!(generation, "3");

    cluster
        .ok(&[
            "apply",
            "--server-side",
            "-f",
            "crates/api/test_data/seed/basic.yaml",
        ])
        .await;
    let names = cluster
        .ok(&["get", "buildplanes", "-n", "my-org", "-o", "name"])
        .await;
    assert!(
        names.contains("buildplane.openchoreo.dev/production-buildplane"),
        "{names}"
    );
    cluster
        .ok(&[
            "delete",
            "buildplane",
            "production-buildplane",
            "-n",
            "my-org",
        ])
        .await;
    let names = cluster
        .ok(&["get", "buildplanes", "-n", "my-org", "-o", "name"])
        .await;
    assert!(!names.contains("production-buildplane"), "{names}");
    cluster.server.shutdown().await;
}

/// An invalid planeID is rejected with the API server's message naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_rejects_an_invalid_plane_id() {
    let cluster = Cluster::start().await;
    cluster.ok(&["apply", "-f", "k3d/manifests/crds/"]).await;
    cluster.ok(&["create", "namespace", "org"]).await;
    let manifest = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: bad, namespace: org}\nspec:\n  planeID: Bad_ID\n  clusterAgent: {clientCA: {value: pem}}\n";
    let output = cluster.kubectl(&["apply", "-f", "-"], Some(manifest)).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(r#"spec.planeID: Invalid value: "Bad_ID": spec.planeID in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#),
        "{stderr}"
    );
    let both = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: both, namespace: org}\nspec:\n  clusterAgent: {clientCA: {value: pem, secretRef: {name: s, key: k}}}\n";
    let output = cluster.kubectl(&["apply", "-f", "-"], Some(both)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("exactly one of secretRef or value must be set"),
        "{stderr}"
    );
    cluster.server.shutdown().await;
}

/// Requests without the bearer token get 401.
#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_token_are_unauthorised() {
    let cluster = Cluster::start().await;
    let output = cluster
        .kubectl(&["get", "namespaces", "--token", "wrong"], None)
        .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Unauthorized") || stderr.contains("provide credentials"),
        "{stderr}"
    );
    cluster.server.shutdown().await;
}
