//! The Kubernetes client of a process: from `--kubeconfig` when given, else the in-cluster
//! configuration (or `$KUBECONFIG`/`~/.kube/config`, as kube-rs infers it).

use std::path::{Path, PathBuf};

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The configuration could not be inferred (no kubeconfig, not in a cluster).
    #[error("inferring the Kubernetes configuration")]
    Infer(#[source] kube::config::InferConfigError),
    /// The kubeconfig names something unusable (context, credentials, certificates).
    #[error("loading kubeconfig {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig file could not be read or parsed.
    #[error("reading kubeconfig {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The configuration is valid but no client can be built from it (e.g. a proxy).
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The configuration of `kubeconfig` (its current context), or the inferred one when `None`.
pub async fn kube_config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeconfigError> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeconfigError::Read {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeconfigError::Load {
                    path: path.to_owned(),
                    source,
                })
        }
        None => kube::Config::infer().await.map_err(KubeconfigError::Infer),
    }
}

/// A client for [`kube_config`] (kube-rs refreshes a projected service-account token itself).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeconfigError> {
    kube::Client::try_from(kube_config(kubeconfig).await?).map_err(KubeconfigError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing kubeconfig file names the file; a malformed one too.
    #[tokio::test]
    async fn unreadable_kubeconfig_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = kube_config(Some(&missing)).await.expect_err("missing file");
        assert!(matches!(err, KubeconfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");

        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "clusters: 5\n").unwrap();
        let err = kube_config(Some(&garbage)).await.expect_err("garbage");
        assert!(err.to_string().contains("garbage"), "{err}");
    }

    /// A kubeconfig with a current context gives a client for its server.
    #[tokio::test]
    async fn kubeconfig_gives_a_client_for_its_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {token: t}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u, namespace: ns}}]\n",
        )
        .unwrap();
        let config = kube_config(Some(&path)).await.unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(config.default_namespace, "ns");
        let client = kube_client(Some(&path)).await.unwrap();
        assert_eq!(client.default_namespace(), "ns");
    }
}
