//! Many agents in one process, for storms: one generated CA shared by all, one client leaf (own
//! key, so own identity) and one planeID (`PREFIX-0..PREFIX-(N-1)`) per agent, one shared
//! Kubernetes client for the build cluster.

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::BuildCluster;
use anyhow::Context as _;
use buildplane_pki::{Ca, ReloadableCert};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{Agent, AgentConfig};

/// Swarm settings.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Number of agents.
    pub count: usize,
    /// planeIDs are `{prefix}-{i}`.
    pub plane_id_prefix: String,
    /// Settings shared by every agent (its `plane_id` is replaced per agent).
    pub agent: AgentConfig,
    /// Where to write the shared CA (PEM), once generated.
    pub ca_out: Option<PathBuf>,
}

/// A running swarm.
pub struct Swarm {
    /// The CA every agent's leaf is issued by (put it in each BuildPlane's `clientCA`).
    pub ca_pem: String,
    /// The agents, in planeID order.
    pub agents: Vec<Arc<Agent>>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Swarm {
    /// Starts `config.count` agents against `cluster`.
    pub fn start(
        config: SwarmConfig,
        cluster: BuildCluster,
        server_ca_pem: &[u8],
    ) -> anyhow::Result<Swarm> {
        buildplane_pki::install_crypto_provider();
        let ca = Ca::generate(
            &format!("cluster-agent-swarm-{}", config.plane_id_prefix),
            Duration::from_secs(365 * 86_400),
        )?;
        if let Some(path) = &config.ca_out {
            // Write then rename, so a reader never sees half a PEM.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, ca.cert_pem())
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        }
        let shutdown = CancellationToken::new();
        let mut agents = Vec::with_capacity(config.count);
        let mut tasks = Vec::with_capacity(config.count);
        for i in 0..config.count {
            let plane_id = format!("{}-{i}", config.plane_id_prefix);
            let leaf = ca.issue_client(&plane_id, config.agent.leaf_validity)?;
            let cert = ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem)?;
            let mut agent_config = config.agent.clone();
            agent_config.plane_id = plane_id;
            agent_config.agent_id = uuid::Uuid::new_v4().to_string();
            agent_config.health_listen = None;
            let agent = Agent::new(agent_config, cluster.clone(), server_ca_pem, cert)?;
            tasks.push(tokio::spawn(agent.clone().supervise(shutdown.clone())));
            agents.push(agent);
        }
        info!(
            count = config.count,
            prefix = %config.plane_id_prefix,
            "swarm started"
        );
        Ok(Swarm {
            ca_pem: ca.cert_pem().to_owned(),
            agents,
            shutdown,
            tasks,
        })
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.agents.iter().filter(|a| a.is_connected()).count()
    }

    /// Stops every agent (draining in-flight requests).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(35), task).await;
        }
    }
}

/// `cluster-agent swarm`: runs until SIGINT/SIGTERM, logging the connected count now and then.
pub async fn run(config: SwarmConfig, server_ca: PathBuf) -> anyhow::Result<()> {
    let cluster = crate::build_cluster(config.agent.kubeconfig.as_ref()).await?;
    let server_ca = std::fs::read(&server_ca)
        .with_context(|| format!("reading the gateway CA {}", server_ca.display()))?;
    let swarm = Swarm::start(config, cluster, &server_ca)?;
    let mut report = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = report.tick() => info!(connected = swarm.connected(), total = swarm.agents.len(), "swarm"),
            () = buildplane_runtime::shutdown_signal() => break,
        }
    }
    swarm.shutdown().await;
    Ok(())
}
