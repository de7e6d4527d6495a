//! The `kube-sim serve` binary: used by hand through the kubeconfig it writes, instances side by
//! side, and durability across `kill -9` with `--data-dir` (same port, CA and token; every
//! acknowledged write kept; a torn last record ignored; watchers carry on).

mod common;

use std::{path::Path, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{watcher, watcher::Event},
};
use tokio::io::AsyncBufReadExt;

struct Proc {
    child: tokio::process::Child,
    url: String,
}

/// Starts `kube-sim serve` and waits for its `listening on` line.
async fn serve(kubeconfig: &Path, data_dir: Option<&Path>, name: &str) -> Proc {
    serve_with(kubeconfig, data_dir, name, &[]).await
}

/// The same with more flags.
async fn serve_with(
    kubeconfig: &Path,
    data_dir: Option<&Path>,
    name: &str,
    flags: &[&str],
) -> Proc {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kube-sim"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--kubeconfig-out",
        ])
        .arg(kubeconfig)
        .args(flags)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = data_dir {
        command.arg("--data-dir").arg(dir);
    }
    let mut child = command.spawn().expect("kube-sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening in time")
        .expect("read")
        .expect("a line");
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(
        kubeconfig.exists(),
        "the kubeconfig is written before the line"
    );
    Proc { child, url }
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([("v".to_owned(), value.to_owned())].into()),
        ..ConfigMap::default()
    }
}

/// Every acknowledged write survives `kill -9`; the restarted process keeps its port, CA and
/// token (the old kubeconfig works, kubectl included); a running watcher sees later changes; a
/// torn last record is ignored. (Fails if acknowledged writes are not logged and replayed, or if
/// the identity or port change across restarts. `kill -9` keeps the page cache, so this cannot
/// tell a synced write from an unsynced one: `store::tests::every_write_is_synced_before_it_is_acknowledged`
/// checks the sync.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    let data = dir.path().join("data");
    let mut first = serve(&kubeconfig, Some(&data), "control").await;
    let original_kubeconfig = std::fs::read_to_string(&kubeconfig).expect("read");
    let client = client_for(&kubeconfig).await;
    common::create_namespace(&client, "durable").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "durable");
    let writes = (0..40).map(|i| {
        let api = api.clone();
        async move {
            api.create(
                &PostParams::default(),
                &config_map(&format!("cm-{i}"), "v1"),
            )
            .await
            .expect("acknowledged")
        }
    });
    futures::future::join_all(writes).await;
    for i in 0..10 {
        api.patch(
            &format!("cm-{i}"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"v": "v2"}})),
        )
        .await
        .expect("acknowledged update");
    }
    api.delete("cm-39", &DeleteParams::default())
        .await
        .expect("acknowledged delete");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("initial list in time")
            .expect("open");
        if matches!(event, Ok(Event::InitDone)) {
            break;
        }
    }

    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("reaped");
    // A crash in the middle of an append leaves a torn last line; it was never acknowledged.
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("objects.jsonl"))
        .expect("log")
        .write_all(br#"{"rv":999999,"key":{"resource":{"gro"#)
        .expect("torn write");

    let second = serve(&kubeconfig, Some(&data), "control").await;
    assert_eq!(second.url, first.url, "the same port");
    assert_eq!(
        std::fs::read_to_string(&kubeconfig).expect("read"),
        original_kubeconfig,
        "the same CA, token and URL"
    );
    let items = api
        .list(&Default::default())
        .await
        .expect("old client still works")
        .items;
    assert_eq!(items.len(), 39);
    for item in &items {
        let index: usize = item.name_any()["cm-".len()..].parse().expect("index");
        let expected = if index < 10 { "v2" } else { "v1" };
        assert_eq!(
            item.data.as_ref().expect("data")["v"],
            expected,
            "{}",
            item.name_any()
        );
    }
    api.patch(
        "cm-20",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"v": "after"}})),
    )
    .await
    .expect("write after restart");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.next().await.expect("open") {
                Ok(Event::Apply(cm) | Event::InitApply(cm))
                    if cm.data.as_ref().is_some_and(|d| d["v"] == "after") =>
                {
                    return;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the watcher carried on across the restart");

    let kubectl = common::Kubectl {
        dir: tempfile::tempdir().expect("dir"),
    };
    std::fs::copy(&kubeconfig, kubectl.kubeconfig()).expect("copy");
    let out = kubectl
        .ok(&[
            "get",
            "configmap",
            "cm-0",
            "-n",
            "durable",
            "-o",
            "jsonpath={.data.v}",
        ])
        .await;
    assert_eq!(out, "v2");
}

/// Two instances run side by side on their own ports with distinct context names, and kubectl
/// reaches each through a merged KUBECONFIG.
#[tokio::test(flavor = "multi_thread")]
async fn instances_run_side_by_side() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control_config = dir.path().join("control.kubeconfig");
    let build_config = dir.path().join("build.kubeconfig");
    let control = serve(&control_config, None, "control").await;
    let build = serve(&build_config, None, "build").await;
    assert_ne!(control.url, build.url);
    let control_client = client_for(&control_config).await;
    Api::<ConfigMap>::namespaced(control_client, "default")
        .create(&PostParams::default(), &config_map("only-in-control", "x"))
        .await
        .expect("created");
    let merged = format!("{}:{}", control_config.display(), build_config.display());
    let get = |context: &'static str| {
        let merged = merged.clone();
        async move {
            let output = tokio::process::Command::new("kubectl")
                .env("KUBECONFIG", &merged)
                .args([
                    "--context",
                    context,
                    "get",
                    "configmaps",
                    "-n",
                    "default",
                    "-o",
                    "name",
                ])
                .output()
                .await
                .expect("kubectl");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    assert_eq!(get("control").await.trim(), "configmap/only-in-control");
    assert_eq!(get("build").await.trim(), "");
}

/// `--kubeconfig-auth client-certificate` writes a kubeconfig whose user is the admin client
/// certificate (no token); kubectl is `kubernetes-admin` with it, and with `--data-dir` the same
/// certificate works after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_kubeconfig_can_carry_the_admin_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    let data = dir.path().join("data");
    let flags = ["--kubeconfig-auth", "client-certificate"];
    let mut first = serve_with(&kubeconfig, Some(&data), "control", &flags).await;
    let written = std::fs::read_to_string(&kubeconfig).expect("read");
    assert!(
        written.contains("client-certificate-data") && !written.contains("token"),
        "{written}"
    );
    let kubectl = common::Kubectl::with_kubeconfig(&written);
    let whoami = || async {
        kubectl
            .ok(&[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ])
            .await
    };
    assert_eq!(whoami().await, "kubernetes-admin");
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("reaped");
    let _second = serve_with(&kubeconfig, Some(&data), "control", &flags).await;
    assert_eq!(
        std::fs::read_to_string(&kubeconfig).expect("read"),
        written,
        "the same certificate"
    );
    assert_eq!(whoami().await, "kubernetes-admin");
}
