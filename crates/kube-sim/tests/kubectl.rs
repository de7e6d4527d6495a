//! The real `kubectl` (1.32) against kube-sim: the seed's registration commands, printer columns,
//! validation messages, patches of every type, waits, client- and server-side apply, deletion.

mod common;

use base64::Engine as _;
use common::{Kubectl, crd_dir, header, start};

fn real_ca_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("self-signed").pem()
}

/// The seed's registration workflow and day-to-day kubectl commands work unchanged.
/// (Fails if: Table rows or printer columns are wrong, secrets lose bytes, status writes leak
/// into the main resource, generation is not bumped, or SSA cannot create.)
async fn generation(kubectl: &Kubectl, name: &str) -> String {
    kubectl
        .ok(&[
            "get",
            "buildplane",
            name,
            "-n",
            "my-org",
            "-o",
            "jsonpath={.metadata.generation}",
        ])
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_registration_workflow() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["apply", "-f", crd_dir()]).await;
    kubectl
        .ok(&[
            "wait",
            "--for=condition=Established",
            "crd/buildplanes.openchoreo.dev",
            "--timeout=10s",
        ])
        .await;
    kubectl.ok(&["create", "namespace", "my-org"]).await;
    let ca = kubectl.dir.path().join("buildplane-ca.crt");
    std::fs::write(&ca, real_ca_pem()).expect("write");
    kubectl
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
    let extracted = kubectl
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
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(extracted.trim())
        .expect("base64");
    assert_eq!(decoded, std::fs::read(&ca).expect("read"));
    let secrets = kubectl.ok(&["get", "secrets", "-n", "my-org"]).await;
    assert_eq!(
        header(&secrets),
        ["NAME", "TYPE", "DATA", "AGE"],
        "{secrets}"
    );
    assert!(secrets.contains("Opaque"), "{secrets}");

    kubectl
        .ok(&[
            "apply",
            "-f",
            "crates/api/test_data/seed/option2-secret-ref.yaml",
        ])
        .await;
    kubectl
        .ok(&[
            "apply",
            "-f",
            "crates/api/test_data/seed/option1-inline-value.yaml",
        ])
        .await;
    // Client-side apply switched from secretRef to value: the merge patch removed secretRef.
    let client_ca = kubectl
        .ok(&[
            "get",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "-o",
            "jsonpath={.spec.clusterAgent.clientCA}",
        ])
        .await;
    assert!(
        client_ca.contains("BEGIN CERTIFICATE") && !client_ca.contains("secretRef"),
        "{client_ca}"
    );
    kubectl
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
    kubectl
        .ok(&[
            "wait",
            "--for=jsonpath={.status.agentConnection.connected}=true",
            "buildplane/my-buildplane",
            "-n",
            "my-org",
            "--timeout=10s",
        ])
        .await;
    let table = kubectl.ok(&["get", "buildplanes", "-n", "my-org"]).await;
    assert_eq!(
        header(&table),
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
    assert_eq!(
        generation(&kubectl, "my-buildplane").await,
        "2",
        "option 1 re-applied a new spec once"
    );
    kubectl
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
    assert_eq!(generation(&kubectl, "my-buildplane").await, "3");
    kubectl
        .ok(&[
            "patch",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/planeID","value":"ci-2"}]"#,
        ])
        .await;
    assert_eq!(generation(&kubectl, "my-buildplane").await, "4");

    // An events.k8s.io Event about the BuildPlane shows in describe and `get events`.
    let uid = kubectl
        .ok(&[
            "get",
            "buildplane",
            "my-buildplane",
            "-n",
            "my-org",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;
    let event = format!(
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {{name: my-buildplane.1, namespace: my-org}}\neventTime: \"2026-01-01T00:00:00.000000Z\"\nreportingController: buildplane-controller\nreportingInstance: c-0\naction: Reconcile\nreason: AgentsConnected\ntype: Normal\nnote: 2 agents connected\nregarding: {{apiVersion: openchoreo.dev/v1alpha1, kind: BuildPlane, name: my-buildplane, namespace: my-org, uid: {uid}}}\n"
    );
    kubectl.ok_with(&["create", "-f", "-"], Some(&event)).await;
    let described = kubectl
        .ok(&["describe", "buildplane", "my-buildplane", "-n", "my-org"])
        .await;
    assert!(
        described.contains("AgentsConnected") && described.contains("2 agents connected"),
        "{described}"
    );
    let events = kubectl.ok(&["get", "events", "-n", "my-org"]).await;
    assert!(events.contains("buildplane/my-buildplane"), "{events}");
    // Both versions print with the real server's one Event printer (wide columns too).
    for resource in ["events", "events.events.k8s.io"] {
        let wide = kubectl
            .ok(&["get", resource, "-n", "my-org", "-o", "wide"])
            .await;
        assert_eq!(
            header(&wide),
            [
                "LAST",
                "SEEN",
                "TYPE",
                "REASON",
                "OBJECT",
                "SUBOBJECT",
                "SOURCE",
                "MESSAGE",
                "FIRST",
                "SEEN",
                "COUNT",
                "NAME"
            ],
            "{wide}"
        );
        let row: Vec<&str> = wide
            .lines()
            .find(|l| l.contains("my-buildplane.1"))
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(row.len(), 12, "{wide}");
        assert_eq!(
            [&row[1..9], &row[10..]].concat(),
            [
                "Normal",
                "AgentsConnected",
                "buildplane/my-buildplane",
                "buildplane-controller,",
                "c-0",
                "2",
                "agents",
                "connected",
                "1",
                "my-buildplane.1"
            ],
            "{wide}"
        );
    }
    let listed = kubectl
        .ok(&[
            "events",
            "-n",
            "my-org",
            "--for",
            "buildplane/my-buildplane",
        ])
        .await;
    assert_eq!(
        header(&listed),
        ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
        "{listed}"
    );
    assert!(
        listed.contains("AgentsConnected   BuildPlane/my-buildplane   2 agents connected"),
        "{listed}"
    );
    assert_eq!(
        kubectl
            .ok(&["auth", "can-i", "create", "buildplanes"])
            .await
            .trim(),
        "yes"
    );

    kubectl
        .ok(&[
            "apply",
            "--server-side",
            "-f",
            "crates/api/test_data/seed/basic.yaml",
        ])
        .await;
    let names = kubectl
        .ok(&["get", "buildplanes", "-n", "my-org", "-o", "name"])
        .await;
    assert!(
        names.contains("buildplane.openchoreo.dev/production-buildplane"),
        "{names}"
    );
    kubectl
        .ok(&[
            "delete",
            "buildplane",
            "production-buildplane",
            "-n",
            "my-org",
        ])
        .await;
    let names = kubectl
        .ok(&["get", "buildplanes", "-n", "my-org", "-o", "name"])
        .await;
    assert!(!names.contains("production-buildplane"), "{names}");
    server.shutdown().await;
}

/// An invalid planeID is rejected with the API server's message naming the field; so are both
/// CA sources at once (CEL) and unknown fields (kubectl's strict field validation).
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_rejects_invalid_buildplanes() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["apply", "-f", crd_dir()]).await;
    kubectl.ok(&["create", "namespace", "org"]).await;
    let manifest = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: x, namespace: org}\nspec:\n  planeID: Bad\n  clusterAgent: {clientCA: {value: pem}}\n";
    let stderr = kubectl.fails(&["apply", "-f", "-"], Some(manifest)).await;
    assert!(
        stderr.contains(r#"The BuildPlane "x" is invalid: spec.planeID: Invalid value: "Bad": spec.planeID in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"#),
        "{stderr}"
    );
    let both = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: both, namespace: org}\nspec:\n  clusterAgent: {clientCA: {value: pem, secretRef: {name: s, key: k}}}\n";
    let stderr = kubectl.fails(&["apply", "-f", "-"], Some(both)).await;
    assert!(
        stderr.contains(
            "spec.clusterAgent.clientCA: Invalid value: exactly one of secretRef or value must be set"
        ),
        "{stderr}"
    );
    let long = format!(
        "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {{name: long, namespace: org}}\nspec:\n  planeID: {}\n  clusterAgent: {{clientCA: {{value: pem}}}}\n",
        "a".repeat(64)
    );
    let stderr = kubectl.fails(&["apply", "-f", "-"], Some(&long)).await;
    assert!(stderr.contains("spec.planeID: Too long"), "{stderr}");
    let unknown = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: typo, namespace: org}\nspec:\n  planeId: typo\n  clusterAgent: {clientCA: {value: pem}}\n";
    let stderr = kubectl.fails(&["apply", "-f", "-"], Some(unknown)).await;
    assert!(
        stderr.contains(r#"strict decoding error: unknown field "spec.planeId""#),
        "{stderr}"
    );
    // With validation off, the unknown field is pruned and the object stored.
    kubectl
        .ok_with(&["apply", "--validate=false", "-f", "-"], Some(unknown))
        .await;
    let spec = kubectl
        .ok(&[
            "get",
            "buildplane",
            "typo",
            "-n",
            "org",
            "-o",
            "jsonpath={.spec}",
        ])
        .await;
    assert!(!spec.contains("planeId"), "{spec}");
    let stored = kubectl
        .ok(&["get", "buildplanes", "-n", "org", "-o", "name"])
        .await;
    assert_eq!(
        stored.trim(),
        "buildplane.openchoreo.dev/typo",
        "nothing invalid was stored"
    );
    server.shutdown().await;
}

/// Built-in kinds: strategic merge patches, client-side apply removing a field through the
/// last-applied annotation, short names, cluster-scoped CRs, and `kubectl api-resources`.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_patches_and_applies_builtin_kinds() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["apply", "-f", crd_dir()]).await;
    kubectl
        .ok(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=30s",
        ])
        .await;
    let resources = kubectl.ok(&["api-resources"]).await;
    let cbp = resources
        .lines()
        .find(|l| l.starts_with("clusterbuildplanes"))
        .expect("clusterbuildplanes listed");
    assert!(cbp.contains("cbp,cbps") && cbp.contains("false"), "{cbp}");

    let v1 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: default, labels: {a: '1'}}\ndata: {keep: x, drop: z}\n";
    kubectl.ok_with(&["apply", "-f", "-"], Some(v1)).await;
    // YAML 1.1 reads `y` as true, and a ConfigMap's data holds strings only.
    let boolean = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: flags, namespace: default}\ndata: {flag: y}\n";
    let stderr = kubectl.fails(&["apply", "-f", "-"], Some(boolean)).await;
    assert!(
        stderr.contains("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: json: cannot unmarshal bool into Go struct field ConfigMap.data of type string"),
        "{stderr}"
    );
    let v2 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: default, labels: {a: '1'}}\ndata: {keep: x2}\n";
    kubectl.ok_with(&["apply", "-f", "-"], Some(v2)).await;
    let data = kubectl
        .ok(&["get", "cm", "cfg", "-o", "jsonpath={.data}"])
        .await;
    assert_eq!(
        data, r#"{"keep":"x2"}"#,
        "the three-way patch removed `drop`"
    );
    kubectl
        .ok(&[
            "patch",
            "configmap",
            "cfg",
            "-p",
            r#"{"metadata":{"finalizers":["a/b"]},"data":{"more":"z"}}"#,
        ])
        .await;
    kubectl
        .ok(&[
            "patch",
            "configmap",
            "cfg",
            "-p",
            r#"{"metadata":{"finalizers":["c/d"]}}"#,
        ])
        .await;
    let finalizers = kubectl
        .ok(&["get", "cm", "cfg", "-o", "jsonpath={.metadata.finalizers}"])
        .await;
    assert_eq!(
        finalizers, r#"["c/d","a/b"]"#,
        "finalizers merge as a set, the patch's first"
    );
    kubectl
        .ok(&[
            "patch",
            "configmap",
            "cfg",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .await;

    // Strategic merge patches are refused for custom resources, as on a real server.
    let cbp_manifest = "apiVersion: openchoreo.dev/v1alpha1\nkind: ClusterBuildPlane\nmetadata: {name: shared}\nspec:\n  planeID: shared\n  clusterAgent: {clientCA: {value: pem}}\n";
    kubectl
        .ok_with(&["apply", "-f", "-"], Some(cbp_manifest))
        .await;
    let listed = kubectl.ok(&["get", "cbp"]).await;
    assert!(listed.contains("shared"), "{listed}");
    let stderr = kubectl
        .fails(
            &[
                "patch",
                "cbp",
                "shared",
                "-p",
                r#"{"spec":{"planeID":"x"}}"#,
            ],
            None,
        )
        .await;
    assert!(
        stderr.contains("UnsupportedMediaType") || stderr.contains("unknown format"),
        "{stderr}"
    );
    server.shutdown().await;
}

/// Server-side apply: conflicts with another manager are reported and `--force-conflicts`
/// takes the field over.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_server_side_apply_conflicts() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl
        .ok(&["apply", "--server-side", "-f", crd_dir()])
        .await;
    kubectl.ok(&["create", "namespace", "org"]).await;
    let manifest = "apiVersion: openchoreo.dev/v1alpha1\nkind: BuildPlane\nmetadata: {name: bp, namespace: org}\nspec:\n  planeID: one\n  clusterAgent: {clientCA: {value: pem}}\n";
    kubectl
        .ok_with(&["apply", "--server-side", "-f", "-"], Some(manifest))
        .await;
    kubectl
        .ok(&[
            "patch",
            "buildplane",
            "bp",
            "-n",
            "org",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"planeID":"two"}}"#,
        ])
        .await;
    let changed = manifest.replace("planeID: one", "planeID: three");
    let stderr = kubectl
        .fails(&["apply", "--server-side", "-f", "-"], Some(&changed))
        .await;
    assert!(
        stderr.contains("conflict")
            && stderr.contains(".spec.planeID")
            && stderr.contains("kubectl-patch"),
        "{stderr}"
    );
    kubectl
        .ok_with(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&changed),
        )
        .await;
    let plane_id = kubectl
        .ok(&[
            "get",
            "buildplane",
            "bp",
            "-n",
            "org",
            "-o",
            "jsonpath={.spec.planeID}",
        ])
        .await;
    assert_eq!(plane_id, "three");
    server.shutdown().await;
}

/// Deleting a namespace removes its contents; an object with a finalizer keeps the namespace
/// Terminating until the finalizer is removed.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_namespace_deletion_waits_for_finalizers() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["create", "namespace", "doomed"]).await;
    kubectl
        .ok(&[
            "create",
            "configmap",
            "plain",
            "-n",
            "doomed",
            "--from-literal=a=b",
        ])
        .await;
    let held = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, namespace: doomed, finalizers: [example.com/hold]}\n";
    kubectl.ok_with(&["apply", "-f", "-"], Some(held)).await;
    kubectl
        .ok(&["delete", "namespace", "doomed", "--wait=false"])
        .await;
    let phase = kubectl
        .ok(&[
            "get",
            "namespace",
            "doomed",
            "-o",
            "jsonpath={.status.phase}",
        ])
        .await;
    assert_eq!(phase, "Terminating");
    // kube-sim empties the namespace in the delete request; the real server's namespace
    // controller within seconds.
    let mut left = String::new();
    for _ in 0..150 {
        left = kubectl
            .ok(&["get", "configmaps", "-n", "doomed", "-o", "name"])
            .await;
        if left.trim() == "configmap/held" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        left.trim(),
        "configmap/held",
        "only the held object remains"
    );
    let stderr = kubectl
        .fails(&["create", "configmap", "late", "-n", "doomed"], None)
        .await;
    assert!(stderr.contains("being terminated"), "{stderr}");
    kubectl
        .ok(&[
            "patch",
            "configmap",
            "held",
            "-n",
            "doomed",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .await;
    kubectl
        .ok(&["wait", "--for=delete", "namespace/doomed", "--timeout=10s"])
        .await;
    server.shutdown().await;
}

/// Requests without the bearer token get 401.
#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_token_are_unauthorised() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    if server.is_real() {
        // Its admin authenticates with a client certificate, which the server tries before a
        // token: drop the certificate so the wrong token is all that is presented.
        let path = kubectl.kubeconfig();
        let text = std::fs::read_to_string(&path).expect("kubeconfig");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                !line.contains("client-certificate-data") && !line.contains("client-key-data")
            })
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("kubeconfig written");
    }
    let stderr = kubectl
        .fails(&["get", "namespaces", "--token", "wrong"], None)
        .await;
    assert!(
        stderr.contains("Unauthorized") || stderr.contains("provide credentials"),
        "{stderr}"
    );
    server.shutdown().await;
}

/// Nodes without a kubelet: created by hand, cordoned with kubectl (a merge patch of
/// `spec.unschedulable`), selected by `spec.unschedulable` (a missing field is `false`).
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_cordons_nodes_and_selects_them_by_unschedulable() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    for name in ["n1", "n2"] {
        let node = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
        kubectl.ok_with(&["create", "-f", "-"], Some(&node)).await;
    }
    kubectl.ok(&["cordon", "n1"]).await;
    let selected = |value: &'static str| {
        let kubectl = &kubectl;
        async move {
            kubectl
                .ok(&[
                    "get",
                    "nodes",
                    "--field-selector",
                    &format!("spec.unschedulable={value}"),
                    "-o",
                    "name",
                ])
                .await
        }
    };
    assert_eq!(selected("true").await.trim(), "node/n1");
    assert_eq!(selected("false").await.trim(), "node/n2");
    kubectl.ok(&["uncordon", "n1"]).await;
    assert_eq!(selected("true").await.trim(), "");
    assert_eq!(selected("false").await.trim(), "node/n1\nnode/n2");
    let stderr = kubectl
        .fails(
            &["get", "nodes", "--field-selector", "spec.nodeName=x"],
            None,
        )
        .await;
    assert!(
        stderr.contains("field label not supported: spec.nodeName"),
        "{stderr}"
    );
    server.shutdown().await;
}

/// A PEM certificate request (base64, as `spec.request` holds it).
fn csr_request(name: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let pem = params
        .serialize_request(&key)
        .expect("request")
        .pem()
        .expect("pem");
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// kubectl with the admin kubeconfig that authenticates with a client certificate (as kubeadm,
/// kind and k3d write it): `kubectl auth whoami` names `kubernetes-admin` in `system:masters`
/// with the certificate's credential id, and `kubectl get csr` shows it as the requester.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_authenticates_with_a_client_certificate() {
    let server = start().await;
    let yaml = server.cert_kubeconfig_yaml();
    assert!(
        yaml.contains("client-certificate-data") && !yaml.contains("token"),
        "{yaml}"
    );
    let kubectl = Kubectl::with_kubeconfig(&yaml);
    let whoami = kubectl.ok(&["auth", "whoami"]).await;
    let rows: Vec<Vec<&str>> = whoami
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["ATTRIBUTE", "VALUE"], "{whoami}");
    assert_eq!(rows[1], ["Username", "kubernetes-admin"], "{whoami}");
    assert_eq!(
        rows[2],
        ["Groups", "[system:masters", "system:authenticated]"],
        "{whoami}"
    );
    assert_eq!(
        rows[3][..2],
        ["Extra:", "authentication.kubernetes.io/credential-id"],
        "{whoami}"
    );
    assert!(rows[3][2].starts_with("[X509SHA256="), "{whoami}");
    let manifest = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: by-admin\nspec:\n  request: {}\n  signerName: example.com/signer\n  usages: [client auth]\n",
        csr_request("by-admin")
    );
    kubectl
        .ok_with(&["create", "-f", "-"], Some(&manifest))
        .await;
    let table = kubectl.ok(&["get", "csr", "by-admin"]).await;
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[3], "kubernetes-admin", "{table}");
    server.shutdown().await;
}

/// `kubectl certificate approve|deny` put an Approved or Denied condition through the
/// `approval` subresource (kubectl sends it as protobuf), and `kubectl get csr` shows it in the
/// real server's columns. The signer is a custom one, so no controller issues a certificate.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_approves_and_denies_certificate_signing_requests() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    for name in ["alice", "mallory"] {
        let manifest = format!(
            "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: {name}\nspec:\n  request: {}\n  signerName: example.com/signer\n  usages: [client auth]\n  expirationSeconds: 86400\n",
            csr_request(name)
        );
        kubectl
            .ok_with(&["create", "-f", "-"], Some(&manifest))
            .await;
    }
    let approved = kubectl.ok(&["certificate", "approve", "alice"]).await;
    assert!(approved.contains("alice approved"), "{approved}");
    let denied = kubectl.ok(&["certificate", "deny", "mallory"]).await;
    assert!(denied.contains("mallory denied"), "{denied}");
    let table = kubectl.ok(&["get", "csr"]).await;
    assert_eq!(
        header(&table),
        [
            "NAME",
            "AGE",
            "SIGNERNAME",
            "REQUESTOR",
            "REQUESTEDDURATION",
            "CONDITION"
        ]
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    for (row, condition) in rows.iter().zip(["Approved", "Denied"]) {
        assert_eq!(row[2], "example.com/signer", "{table}");
        assert_eq!(row[4], "24h", "{table}");
        assert_eq!(row[5], condition, "{table}");
    }
    let reason = kubectl
        .ok(&[
            "get",
            "csr",
            "alice",
            "-o",
            "jsonpath={.status.conditions[0].reason}/{.status.conditions[0].status}",
        ])
        .await;
    assert_eq!(reason, "KubectlApprove/True");
    let transition = kubectl
        .ok(&[
            "get",
            "csr",
            "alice",
            "-o",
            "jsonpath={.status.conditions[0].lastTransitionTime}",
        ])
        .await;
    assert!(transition.starts_with("20"), "{transition}");
    // Approving twice changes nothing: kubectl sees the condition and leaves it.
    kubectl.ok(&["certificate", "approve", "alice"]).await;
    server.shutdown().await;
}

/// `kubectl create token` (a protobuf TokenRequest) issues a token the server accepts:
/// `kubectl auth whoami` with it names the ServiceAccount.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_creates_service_account_tokens() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["create", "serviceaccount", "robot"]).await;
    let token = kubectl
        .ok(&["create", "token", "robot", "--duration=20m"])
        .await;
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let short = kubectl
        .fails(&["create", "token", "robot", "--duration=1m"], None)
        .await;
    assert!(
        short.contains("may not specify a duration less than 10 minutes"),
        "{short}"
    );
    // Only the token: the real cluster's admin certificate would be tried first.
    let as_robot = Kubectl::new(&server);
    let path = as_robot.kubeconfig();
    let text = std::fs::read_to_string(&path).expect("kubeconfig");
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            !line.contains("client-certificate-data")
                && !line.contains("client-key-data")
                && !line.trim_start().starts_with("token:")
        })
        .collect();
    std::fs::write(&path, kept.join("\n")).expect("kubeconfig written");
    let whoami = as_robot
        .ok(&[
            "auth",
            "whoami",
            "--token",
            token,
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .await;
    assert_eq!(whoami, "system:serviceaccount:default:robot");
    server.shutdown().await;
}

/// `kubectl scale` (a merge patch of the `scale` subresource) on a Deployment and on a custom
/// resource whose CRD declares `subresources.scale`; `--current-replicas` is checked against
/// the Scale the server reports.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_scales_deployments_and_custom_resources() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    let crd = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {replicas: {type: integer}}}
          status: {type: object, properties: {replicas: {type: integer}, selector: {type: string}}}
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas, labelSelectorPath: .status.selector}
";
    kubectl.ok_with(&["apply", "-f", "-"], Some(crd)).await;
    kubectl
        .ok(&[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.com",
            "--timeout=30s",
        ])
        .await;
    let deployment = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web, tier: front}}
  template:
    metadata: {labels: {app: web, tier: front}}
    spec:
      containers: [{name: web, image: 'nginx:1.27'}]
";
    kubectl
        .ok_with(&["apply", "-f", "-"], Some(deployment))
        .await;
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: default}\nspec: {replicas: 2}\n";
    // kubectl 1.32 may not have the new resource in its discovery cache yet: retry briefly.
    let mut applied = false;
    for _ in 0..20 {
        if kubectl
            .run(&["apply", "-f", "-"], Some(widget))
            .await
            .status
            .success()
        {
            applied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(applied, "the Widget is applied");

    for (target, replicas) in [("deployment/web", "3"), ("widget/w", "4")] {
        let out = kubectl
            .ok(&["scale", target, &format!("--replicas={replicas}")])
            .await;
        assert!(out.contains("scaled"), "{out}");
        let spec = kubectl
            .ok(&["get", target, "-o", "jsonpath={.spec.replicas}"])
            .await;
        assert_eq!(spec, replicas, "{target}");
    }
    let refused = kubectl
        .fails(
            &["scale", "widget/w", "--current-replicas=3", "--replicas=5"],
            None,
        )
        .await;
    assert!(
        refused.contains("Expected replicas to be 3, was 4"),
        "{refused}"
    );
    let scale = kubectl
        .ok(&[
            "get",
            "--raw",
            "/apis/apps/v1/namespaces/default/deployments/web/scale",
        ])
        .await;
    let scale: serde_json::Value = serde_json::from_str(&scale).expect("a Scale");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["apiVersion"], "autoscaling/v1");
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], "app=web,tier=front");
    server.shutdown().await;
}

/// `kubectl get jobs` prints the real server's columns (and `-o wide` the containers, images and
/// the generated selector). The Job is suspended, so the real cluster's job controller starts
/// nothing and its completions stay 0.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_lists_jobs_with_the_servers_columns() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    let job = "apiVersion: batch/v1
kind: Job
metadata: {name: batch, namespace: default}
spec:
  suspend: true
  completions: 3
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: 'busybox:1.36', command: ['true']}, {name: side, image: busybox}]
";
    kubectl.ok_with(&["apply", "-f", "-"], Some(job)).await;
    let table = kubectl.ok(&["get", "jobs"]).await;
    assert_eq!(
        header(&table),
        ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(row.first(), Some(&"batch"), "{table}");
    assert!(row.contains(&"0/3"), "{table}");
    let uid = kubectl
        .ok(&["get", "job", "batch", "-o", "jsonpath={.metadata.uid}"])
        .await;
    let wide = kubectl.ok(&["get", "jobs", "-o", "wide"]).await;
    assert_eq!(
        header(&wide),
        [
            "NAME",
            "STATUS",
            "COMPLETIONS",
            "DURATION",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]
    );
    let row: Vec<&str> = wide
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        row[row.len() - 3..],
        [
            "work,side",
            "busybox:1.36,busybox",
            format!("batch.kubernetes.io/controller-uid={uid}").as_str()
        ],
        "{wide}"
    );
    server.shutdown().await;
}

/// `kubectl get apiservices` prints the real server's columns (SERVICE `Local`, AVAILABLE `True`)
/// for the built-in group-versions and a CRD's, and `kubectl api-resources` finds them in the
/// `api-extensions` category.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_lists_api_services() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["apply", "-f", crd_dir()]).await;
    kubectl
        .ok(&[
            "wait",
            "--for=condition=Established",
            "crd/buildplanes.openchoreo.dev",
        ])
        .await;
    let table = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let table = kubectl.ok(&["get", "apiservices"]).await;
            if table.contains("v1alpha1.openchoreo.dev") {
                return table;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the CRD's APIService appears");
    assert_eq!(
        header(&table),
        ["NAME", "SERVICE", "AVAILABLE", "AGE"],
        "{table}"
    );
    for name in [
        "v1.",
        "v1.apps",
        "v1.events.k8s.io",
        "v1alpha1.openchoreo.dev",
    ] {
        let row: Vec<&str> = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(&name))
            .unwrap_or_else(|| panic!("{name}: {table}"));
        assert_eq!(&row[1..3], ["Local", "True"], "{table}");
    }
    let extensions = kubectl
        .ok(&[
            "api-resources",
            "--categories",
            "api-extensions",
            "-o",
            "name",
        ])
        .await;
    assert!(
        extensions
            .lines()
            .any(|l| l == "apiservices.apiregistration.k8s.io"),
        "{extensions}"
    );
    server.shutdown().await;
}

/// `kubectl debug` adds an ephemeral container through `pods/ephemeralcontainers` (nothing
/// runs it without a kubelet); a second one keeps the first; a duplicate name is refused with
/// the real server's message.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_debug_adds_ephemeral_containers() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\nspec:\n  containers:\n  - {name: c, image: nginx:1.27}\n";
    // The real server's ServiceAccount admission waits for the `default` account.
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !kubectl
            .run(&["create", "-f", "-"], Some(pod))
            .await
            .status
            .success()
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the pod is created");
    for name in ["dbg", "dbg2"] {
        let out = kubectl
            .ok(&[
                "debug",
                "pod/p",
                "--image=busybox:1.36",
                "--target=c",
                "--profile=general",
                "-c",
                name,
            ])
            .await;
        assert!(out.contains("Targeting container \"c\""), "{out}");
    }
    let names = kubectl
        .ok(&[
            "get",
            "pod",
            "p",
            "-o",
            "jsonpath={.spec.ephemeralContainers[*].name} {.spec.ephemeralContainers[0].targetContainerName} {.status.phase}",
        ])
        .await;
    assert_eq!(names, "dbg dbg2 c Pending");
    let refused = kubectl
        .fails(
            &[
                "debug",
                "pod/p",
                "--image=busybox:1.36",
                "--profile=general",
                "-c",
                "c",
            ],
            None,
        )
        .await;
    assert!(
        refused.contains(
            "Pod \"p\" is invalid: spec.ephemeralContainers[2].name: Duplicate value: \"c\""
        ),
        "{refused}"
    );
    server.shutdown().await;
}

/// `kubectl apply --server-side` of a CRD: applied, re-applied without a change, owned by
/// `kubectl` (spec) and `kube-apiserver` (status), and a conflicting applier is refused with the
/// real server's message.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_server_side_applies_crds() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    let crd = |minimum: u32, short: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget, shortNames: [{short}]}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            properties:\n              size: {{type: integer, minimum: {minimum}}}\n"
        )
    };
    let version = || async {
        kubectl
            .ok(&[
                "get",
                "crd",
                "widgets.example.com",
                "-o",
                "jsonpath={.metadata.resourceVersion} {.metadata.generation}",
            ])
            .await
    };
    let out = kubectl
        .ok_with(&["apply", "--server-side", "-f", "-"], Some(&crd(1, "wd")))
        .await;
    assert_eq!(
        out.trim(),
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.com serverside-applied"
    );
    kubectl
        .ok(&[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.com",
        ])
        .await;
    // The real server's controllers write the status a moment later.
    let managers = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let managers = kubectl
                .ok(&[
                    "get",
                    "crd",
                    "widgets.example.com",
                    "--show-managed-fields",
                    "-o",
                    "jsonpath={.metadata.managedFields[*].manager}",
                ])
                .await;
            if managers.contains("kube-apiserver") {
                return managers;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the status entry");
    assert_eq!(managers, "kubectl kube-apiserver");
    let before = version().await;
    kubectl
        .ok_with(&["apply", "--server-side", "-f", "-"], Some(&crd(1, "wd")))
        .await;
    assert_eq!(version().await, before, "re-applying changes nothing");
    assert!(before.ends_with(" 1"), "{before}");
    let refused = kubectl
        .fails(
            &["apply", "--server-side", "--field-manager=other", "-f", "-"],
            Some(&crd(3, "other")),
        )
        .await;
    assert!(
        refused.contains(
            "Apply failed with 2 conflicts: conflicts with \"kubectl\":\n- .spec.versions\n- .spec.names.shortNames"
        ),
        "{refused}"
    );
    server.shutdown().await;
}

/// `kubectl get componentstatuses` (deprecated): the real server's columns and warning.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_gets_component_statuses() {
    let server = start().await;
    let kubectl = Kubectl::new(&server);
    let output = kubectl.run(&["get", "cs"], None).await;
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let warnings = String::from_utf8_lossy(&output.stderr);
    assert!(
        warnings.contains("Warning: v1 ComponentStatus is deprecated in v1.19+"),
        "{warnings}"
    );
    assert_eq!(
        header(&table),
        ["NAME", "STATUS", "MESSAGE", "ERROR"],
        "{table}"
    );
    let mut rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            vec!["controller-manager", "Unhealthy", "Get"],
            vec!["etcd-0", "Healthy", "ok"],
            vec!["scheduler", "Unhealthy", "Get"],
        ],
        "{table}"
    );
    server.shutdown().await;
}
