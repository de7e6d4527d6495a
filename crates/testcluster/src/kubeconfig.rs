//! The kubeconfig k3s writes names `https://127.0.0.1:6443`, its address inside the container;
//! from the host the API server is at the port Docker mapped. Rewriting only `server` keeps the
//! CA and client certificate, which k3s issued for `127.0.0.1` and `localhost` (its default SANs).

use kube::config::{KubeConfigOptions, Kubeconfig};

/// A kubeconfig that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not YAML, or not a kubeconfig.
    #[error("not a kubeconfig: {0}")]
    Parse(String),
    /// No cluster entry to point anywhere.
    #[error("the kubeconfig has no cluster")]
    NoCluster,
    /// kube-rs rejected it (certificates, context).
    #[error("building a client from it: {0}")]
    Client(String),
}

/// `raw` with every cluster's server set to `https://HOST:PORT`.
///
/// Docker reports the host as `localhost` for a local engine; it is replaced by `127.0.0.1`,
/// which is in k3s's certificate too and avoids an IPv6 `::1` the port is not published on.
pub fn point_at(raw: &str, host: &str, port: u16) -> Result<String, Error> {
    let mut config = Kubeconfig::from_yaml(raw).map_err(|e| Error::Parse(e.to_string()))?;
    if config.clusters.is_empty() {
        return Err(Error::NoCluster);
    }
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    for named in &mut config.clusters {
        let cluster = named.cluster.as_mut().ok_or(Error::NoCluster)?;
        cluster.server = Some(format!("https://{host}:{port}"));
    }
    serde_yaml::to_string(&config).map_err(|e| Error::Parse(e.to_string()))
}

/// A kube-rs client for a kubeconfig (its current context).
pub async fn client(yaml: &str) -> Result<kube::Client, Error> {
    let config = Kubeconfig::from_yaml(yaml).map_err(|e| Error::Parse(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Client(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What k3s v1.3x writes to /etc/rancher/k3s/k3s.yaml (certificates shortened).
    const K3S_YAML: &str = include_str!("../tests/fixtures/k3s.yaml");

    #[test]
    fn the_server_moves_to_the_mapped_port_and_nothing_else_changes() {
        let rewritten = point_at(K3S_YAML, "localhost", 32768).unwrap();
        insta::assert_snapshot!(rewritten);
        let before = Kubeconfig::from_yaml(K3S_YAML).unwrap();
        let after = Kubeconfig::from_yaml(&rewritten).unwrap();
        assert_eq!(
            after.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .server
                .as_deref(),
            Some("https://127.0.0.1:32768")
        );
        assert_eq!(
            after.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .certificate_authority_data,
            before.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .certificate_authority_data
        );
        assert_eq!(
            serde_yaml::to_string(&after.auth_infos).unwrap(),
            serde_yaml::to_string(&before.auth_infos).unwrap()
        );
        assert_eq!(after.current_context, before.current_context);
    }

    #[test]
    fn remote_engines_keep_their_host() {
        let rewritten = point_at(K3S_YAML, "10.0.0.7", 40000).unwrap();
        assert!(
            rewritten.contains("server: https://10.0.0.7:40000"),
            "{rewritten}"
        );
        let v6 = point_at(K3S_YAML, "fd00::7", 40000).unwrap();
        assert!(v6.contains("server: https://[fd00::7]:40000"), "{v6}");
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(matches!(
            point_at("{ not yaml", "h", 1),
            Err(Error::Parse(_))
        ));
        assert!(matches!(
            point_at("apiVersion: v1\nkind: Config\nclusters: []\n", "h", 1),
            Err(Error::NoCluster)
        ));
    }
}
