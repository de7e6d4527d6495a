//! The `kubeconfig` backend: two existing clusters named by kubeconfig contexts, with the
//! gateway, controller and agents installed by someone else.
//!
//! It supports the Kubernetes operations (apply, assert, kubectl, scripts) and requests through
//! a gateway whose internal URL and client certificate are given; component lifecycle and link
//! faults are reported as unsupported, so scenarios that need them fail saying so.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{
    AgentSpec, Backend, BackendError, BoxFuture, ClusterAccess, CommandOutput, ComponentTarget,
    EnvSpec, Environment, GatewayAccess, Result, StopMode, SwarmPlane, SwarmSpec,
};
use crate::proxy::Toxics;
use crate::scenario::ClusterName;

/// Existing clusters.
#[derive(Clone, Debug)]
pub struct KubeconfigBackend {
    /// The kubeconfig file.
    pub kubeconfig: PathBuf,
    /// Context of the control cluster.
    pub control_context: String,
    /// Context of the build cluster.
    pub build_context: String,
    /// The gateway's internal API, when reachable.
    pub gateway: Option<GatewayAccess>,
}

struct KubeconfigEnv {
    backend: KubeconfigBackend,
}

fn unsupported<T>(what: impl Into<String>) -> Result<T> {
    Err(BackendError::Unsupported {
        backend: "kubeconfig",
        what: what.into(),
    })
}

impl Backend for KubeconfigBackend {
    fn name(&self) -> &'static str {
        "kubeconfig"
    }

    fn isolated(&self) -> bool {
        false
    }

    fn environment(&self, _spec: EnvSpec) -> BoxFuture<'_, Result<Box<dyn Environment>>> {
        let env = KubeconfigEnv {
            backend: self.clone(),
        };
        Box::pin(async move { Ok(Box::new(env) as Box<dyn Environment>) })
    }
}

impl Environment for KubeconfigEnv {
    fn cluster(&self, cluster: ClusterName) -> ClusterAccess {
        let context = match cluster {
            ClusterName::Control => self.backend.control_context.clone(),
            ClusterName::Build => self.backend.build_context.clone(),
        };
        ClusterAccess {
            kubeconfig: self.backend.kubeconfig.clone(),
            context,
        }
    }

    fn kubeconfig_env(&self) -> String {
        self.backend.kubeconfig.display().to_string()
    }

    fn gateway(&self) -> Result<GatewayAccess> {
        self.backend
            .gateway
            .clone()
            .map_or_else(|| unsupported("gateway requests without a gateway URL"), Ok)
    }

    fn start_agent(&self, spec: AgentSpec) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { unsupported(format!("starting agent `{}`", spec.name)) })
    }

    fn start_swarm(&self, spec: SwarmSpec) -> BoxFuture<'_, Result<Vec<SwarmPlane>>> {
        Box::pin(async move { unsupported(format!("starting swarm `{}`", spec.name)) })
    }

    fn start(&self, target: ComponentTarget, _args: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { unsupported(format!("starting {target}")) })
    }

    fn stop(&self, target: ComponentTarget, _mode: StopMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { unsupported(format!("stopping {target}")) })
    }

    fn set_faults(&self, link: &str, _toxics: Toxics) -> BoxFuture<'_, Result<()>> {
        let link = link.to_string();
        Box::pin(async move { unsupported(format!("faults on link `{link}`")) })
    }

    fn partition(
        &self,
        replica: &str,
        _from: Option<crate::scenario::PartitionFrom>,
    ) -> Result<()> {
        unsupported(format!("partitioning gateway replica `{replica}`"))
    }

    fn metrics(&self, target: ComponentTarget) -> BoxFuture<'_, Result<String>> {
        Box::pin(async move { unsupported(format!("metrics of {target}")) })
    }

    fn agent_command(
        &self,
        agent: &str,
        _args: Vec<String>,
    ) -> BoxFuture<'_, Result<CommandOutput>> {
        let agent = agent.to_string();
        Box::pin(async move { unsupported(format!("commands for agent `{agent}`")) })
    }

    fn logs(&self, _lines: usize) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
