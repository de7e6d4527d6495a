//! A real cluster as local processes for tests: etcd, kube-apiserver and
//! kube-controller-manager on 127.0.0.1, in a temporary directory, killed when dropped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), buildplane_peers::PeersError> {
//! let cluster = buildplane_peers::LocalCluster::start("my-test").await?;
//! let client = cluster.client().await?;
//! # drop(client); Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{ClusterPorts, ClusterPrograms, PeersError, RealCluster};

/// How long the API server may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Log lines quoted when a program fails.
const TAIL_LINES: usize = 20;

/// A running cluster. Its processes are killed when it is dropped.
pub struct LocalCluster {
    cluster: RealCluster,
    processes: Vec<(String, Child, PathBuf)>,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16, PeersError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| PeersError::Setup {
            what: "choosing a port".into(),
            reason: err.to_string(),
        })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

impl LocalCluster {
    /// Starts a cluster named `name` (also its kubeconfig context) with the programs from the
    /// peers cache, and waits until the API server is ready.
    pub async fn start(name: &str) -> Result<LocalCluster, PeersError> {
        LocalCluster::start_with(name, &ClusterPrograms::locate()?).await
    }

    /// The same with given programs.
    pub async fn start_with(
        name: &str,
        programs: &ClusterPrograms,
    ) -> Result<LocalCluster, PeersError> {
        programs.check()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("cluster-{name}-"))
            .tempdir()
            .map_err(|err| PeersError::Setup {
                what: "creating a temporary directory".into(),
                reason: err.to_string(),
            })?;
        let ports = ClusterPorts {
            etcd_client: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
        };
        let cluster = RealCluster::prepare(dir.path(), name, ports)?;
        let mut local = LocalCluster {
            cluster,
            processes: Vec::new(),
            _dir: dir,
        };
        local.spawn("etcd", &programs.etcd, local.cluster.etcd_args())?;
        local.spawn(
            "kube-apiserver",
            &programs.kube_apiserver,
            local.cluster.apiserver_args(),
        )?;
        local.wait_ready().await?;
        local.spawn(
            "kube-controller-manager",
            &programs.kube_controller_manager,
            local.cluster.controller_manager_args(),
        )?;
        Ok(local)
    }

    fn spawn(&mut self, name: &str, program: &Path, args: Vec<String>) -> Result<(), PeersError> {
        let log = self._dir.path().join(format!("{name}.log"));
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        };
        let setup = |err: std::io::Error| PeersError::Setup {
            what: format!("starting {name}"),
            reason: err.to_string(),
        };
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(open().map_err(setup)?)
            .stderr(open().map_err(setup)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(setup)?;
        self.processes.push((name.to_string(), child, log));
        Ok(())
    }

    /// Fails with the log tail of a process that has exited.
    fn check_alive(&mut self) -> Result<(), PeersError> {
        for (name, child, log) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(PeersError::Unavailable {
                    program: name.clone(),
                    reason: format!("exited with {status}; last log lines:\n{}", tail(log)),
                });
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<(), PeersError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let client = self.client().await?;
        loop {
            self.check_alive()?;
            let request = http::Request::get("/readyz").body(Vec::new());
            if let Ok(request) = request
                && client.request_text(request).await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let log = self
                    .processes
                    .iter()
                    .find(|(name, ..)| name == "kube-apiserver")
                    .map(|(.., log)| tail(log))
                    .unwrap_or_default();
                return Err(PeersError::Unavailable {
                    program: "kube-apiserver".into(),
                    reason: format!("not ready after {READY_TIMEOUT:?}; last log lines:\n{log}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster's files and flags.
    pub fn cluster(&self) -> &RealCluster {
        &self.cluster
    }

    /// The admin kubeconfig (YAML).
    pub fn kubeconfig_yaml(&self) -> String {
        std::fs::read_to_string(&self.cluster.kubeconfig).unwrap_or_default()
    }

    /// Writes the admin kubeconfig to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::copy(&self.cluster.kubeconfig, path).map(|_| ())
    }

    /// A client authenticating as the admin (client certificate).
    pub async fn client(&self) -> Result<kube::Client, PeersError> {
        let setup = |err: String| PeersError::Setup {
            what: "a client from the admin kubeconfig".into(),
            reason: err,
        };
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.cluster.kubeconfig)
            .map_err(|e| setup(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| setup(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| setup(e.to_string()))
    }

    /// Stops every process (SIGKILL: the data is thrown away with the directory).
    pub async fn shutdown(mut self) {
        for (_, child, _) in self.processes.iter_mut().rev() {
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program that is not there is named with the command that builds it, before anything
    /// starts.
    #[tokio::test]
    async fn missing_programs_fail_before_anything_starts() {
        let programs = ClusterPrograms {
            etcd: PathBuf::from("/nonexistent/etcd"),
            kube_apiserver: PathBuf::from("/nonexistent/kube-apiserver"),
            kube_controller_manager: PathBuf::from("/nonexistent/kube-controller-manager"),
        };
        let Err(err) = LocalCluster::start_with("x", &programs).await else {
            panic!("started without programs");
        };
        assert!(err.to_string().contains("cargo xtask peers build"), "{err}");
    }
}
