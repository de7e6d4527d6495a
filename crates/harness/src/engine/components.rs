//! Processes and faults: `start`, `stop`, `kill`, `restart`, `fault`, `heal`, `partition`,
//! `rotateCa`, `renewLeaf` and `generateCa`, their execution and their lint rules.

use std::time::Duration;

use serde_json::Value;

use super::{Engine, OpResultT, fail, first_line, tail_text};
use crate::backend::{AgentSpec, ComponentTarget, StopMode, SwarmSpec};
use crate::kube_ops::ObjectRef;
use crate::lint::{Linter, Seg, with};
use crate::proxy::Toxics;
use crate::result::Failure;
use crate::scenario::{
    ClusterName, ComponentKind, ComponentOp, Count, FaultOp, GenerateCaOp, HealOp, PartitionOp,
    RotateCaOp,
};

impl Engine {
    pub(super) fn target(op: &ComponentOp) -> Result<ComponentTarget, Failure> {
        let kind = op.component.ok_or_else(|| fail("missing `component`"))?;
        Ok(ComponentTarget {
            kind,
            name: op.name.clone(),
            cluster: op.cluster,
        })
    }

    /// `start`, `stop`, `kill` or `restart` (the `action`) of a component.
    pub(super) async fn component(&mut self, op: &ComponentOp, action: &str) -> OpResultT {
        let mut target = Self::target(op)?;
        if let Some(name) = &target.name {
            target.name = Some(self.text(name)?);
        }
        let args = op
            .args
            .iter()
            .map(|a| self.text(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = self.env.clone();
        let res = match (action, target.kind) {
            ("start", ComponentKind::Agent) if op.plane_id.is_none() => {
                env.start(target.clone(), args).await
            }
            ("start", ComponentKind::Agent) => return self.start_agent(op, &target, args).await,
            ("start", ComponentKind::Swarm) => return self.start_swarm(op, &target, args).await,
            ("start", _) => env.start(target.clone(), args).await,
            ("stop", _) => env.stop(target.clone(), StopMode::Graceful).await,
            ("kill", _) => env.stop(target.clone(), StopMode::Kill).await,
            (_, _) => {
                env.stop(target.clone(), StopMode::Graceful)
                    .await
                    .map_err(|e| fail(format!("restart {target}: {e}")))?;
                env.start(target.clone(), args).await
            }
        };
        if target.kind == ComponentKind::Apiserver {
            // A restarted API server may serve new credentials: reconnect on next use.
            self.kube
                .lock()
                .await
                .remove(&target.cluster.unwrap_or(ClusterName::Control));
        }
        res.map_err(|e| fail(format!("{action} {target}: {e}")))
    }

    /// Starts a new agent with its identity namespace (created when missing).
    async fn start_agent(
        &mut self,
        op: &ComponentOp,
        target: &ComponentTarget,
        args: Vec<String>,
    ) -> OpResultT {
        let name = target.name.clone().unwrap_or_default();
        let namespace = self.text(
            op.identity_namespace
                .as_deref()
                .unwrap_or(buildplane_api::names::AGENT_NAMESPACE),
        )?;
        let spec = AgentSpec {
            name: name.clone(),
            plane_id: self.text(op.plane_id.as_deref().unwrap_or_default())?,
            identity_namespace: namespace.clone(),
            protocol: op.protocol.clone(),
            args,
        };
        self.agents.insert(name, namespace.clone());
        self.ensure_namespace(ClusterName::Build, &namespace)
            .await?;
        self.env
            .clone()
            .start_agent(spec)
            .await
            .map_err(|e| fail(format!("start {target}: {e}")))
    }

    /// Starts a swarm and binds its planeIDs to `output`.
    async fn start_swarm(
        &mut self,
        op: &ComponentOp,
        target: &ComponentTarget,
        args: Vec<String>,
    ) -> OpResultT {
        let spec = SwarmSpec {
            name: target.name.clone().unwrap_or_default(),
            count: self.count(op.count.as_ref().unwrap_or(&Count::Literal(0)))?,
            processes: self.count(op.processes.as_ref().unwrap_or(&Count::Literal(4)))? as u32,
            plane_id_prefix: self.text(op.plane_id_prefix.as_deref().unwrap_or_default())?,
            args,
        };
        let planes = self
            .env
            .clone()
            .start_swarm(spec)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if let Some(output) = &op.output {
            self.bindings.set(
                output.clone(),
                serde_json::to_value(planes).unwrap_or_default(),
            );
        }
        Ok(())
    }

    fn toxics(op: &FaultOp) -> Toxics {
        Toxics {
            latency: op.latency.map(Duration::from).unwrap_or_default(),
            jitter: op.jitter.map(Duration::from).unwrap_or_default(),
            bandwidth_kbps: op.bandwidth_kbps.unwrap_or(0),
            blackhole: op.blackhole,
            reset: op.reset,
            slicer_size: op.slicer.as_ref().map_or(0, |s| s.size),
            slicer_delay: op
                .slicer
                .as_ref()
                .map(|s| s.delay.into())
                .unwrap_or_default(),
            partition: op.partition,
            direction: op.direction,
        }
    }

    /// The `fault` operation: toxics on a link.
    pub(super) async fn fault(&self, op: &FaultOp) -> OpResultT {
        self.env
            .set_faults(&self.text(&op.link)?, Self::toxics(op))
            .await
            .map_err(|e| fail(e.to_string()))
    }

    /// The `heal` operation: a link without toxics, or a replica's partition ended.
    pub(super) async fn heal(&self, op: &HealOp) -> OpResultT {
        match (&op.link, &op.name) {
            (Some(link), _) => self
                .env
                .set_faults(&self.text(link)?, Toxics::default())
                .await
                .map_err(|e| fail(e.to_string())),
            (None, Some(name)) => self
                .env
                .partition(&self.text(name)?, None)
                .map_err(|e| fail(e.to_string())),
            (None, None) => Err(fail("heal needs `link`, or `component` and `name`")),
        }
    }

    /// The `partition` operation: a gateway replica cut off.
    pub(super) fn partition(&self, op: &PartitionOp) -> OpResultT {
        self.env
            .partition(&self.text(&op.name)?, Some(op.from))
            .map_err(|e| fail(e.to_string()))
    }

    /// The `generateCa` operation: a throw-away CA's PEM into a binding.
    pub(super) fn generate_ca(&mut self, op: &GenerateCaOp) -> OpResultT {
        let ca = crate::pki::TestCa::generate(&self.text(&op.common_name)?)
            .map_err(|e| fail(e.to_string()))?;
        self.bindings
            .set(op.output.clone(), Value::String(ca.cert_pem));
        Ok(())
    }

    /// The `rotateCa` operation: `cluster-agent rotate-ca [--finish]`.
    pub(super) async fn rotate_ca(&mut self, op: &RotateCaOp) -> OpResultT {
        let mut args = vec!["rotate-ca".to_string()];
        if op.finish {
            args.push("--finish".into());
        }
        self.agent_command(&op.agent, args, &op.output).await
    }

    async fn agent_secret_ca(&self, agent: &str) -> Result<String, Failure> {
        let namespace = self
            .agents
            .get(agent)
            .cloned()
            .ok_or_else(|| fail(format!("no agent `{agent}` was started")))?;
        let kube = self.kube(ClusterName::Build).await?;
        let reference = ObjectRef {
            api_version: "v1".into(),
            kind: "Secret".into(),
            namespace: Some(namespace.clone()),
            name: Some(buildplane_api::names::AGENT_TLS_SECRET.into()),
        };
        let secret = kube
            .get(&reference)
            .await
            .map_err(|e| fail(format!("reading {reference}: {e}")))?
            .ok_or_else(|| fail(format!("{reference} does not exist")))?;
        let encoded = secret
            .pointer("/data/ca.crt")
            .and_then(Value::as_str)
            .unwrap_or_default();
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| fail(format!("{reference} ca.crt is not base64: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `cluster-agent ARGS` for an agent (`rotateCa`, `renewLeaf`); `output` binds its CA.
    pub(super) async fn agent_command(
        &mut self,
        agent: &str,
        args: Vec<String>,
        output: &Option<String>,
    ) -> OpResultT {
        let shown = args.join(" ");
        let res = self
            .env
            .agent_command(agent, args)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if res.code != 0 {
            return Err(Failure {
                message: format!(
                    "`cluster-agent {shown}` for agent {agent} exited with {}: {}",
                    res.code,
                    first_line(&res.stderr)
                ),
                last_seen: Some(format!(
                    "stdout:\n{}\nstderr:\n{}",
                    tail_text(&res.stdout),
                    tail_text(&res.stderr)
                )),
                ..Failure::default()
            });
        }
        if let Some(output) = output {
            let ca = self.agent_secret_ca(agent).await?;
            self.bindings.set(output.clone(), Value::String(ca));
        }
        Ok(())
    }
}

/// Lint rules of this family (called from [`Linter::operation`]).
impl Linter<'_> {
    /// A gateway replica named in `partition` or `heal`: `gateway` and `gateway-<n>` of the
    /// scenario's replicas.
    fn replica(&mut self, path: &[Seg], component: Option<ComponentKind>, name: &str) {
        if component != Some(ComponentKind::Gateway) {
            self.error(
                &with(path, "component"),
                "only a gateway replica is partitioned (`component: gateway`)",
            );
        }
        let index = name
            .strip_prefix("gateway-")
            .and_then(|n| n.parse::<u32>().ok());
        if self.replicas <= 1 {
            self.error(
                path,
                "partitioning a replica needs `gatewayReplicas` above 1 (a single gateway is cut off with `fault: {link: ..., partition: true}`)",
            );
        } else if index.is_none_or(|i| i >= self.replicas) {
            self.error(
                &with(path, "name"),
                format!(
                    "`{name}` is not a replica of this scenario (gateway-0 .. gateway-{})",
                    self.replicas - 1
                ),
            );
        }
    }

    pub(crate) fn component(&mut self, path: &[Seg], op: &ComponentOp, starting: bool) {
        let Some(kind) = op.component else {
            self.error(
                path,
                "missing `component` (agent, apiserver, controller, gateway or swarm)",
            );
            return;
        };
        if matches!(kind, ComponentKind::Agent | ComponentKind::Swarm) && op.name.is_none() {
            self.error(path, format!("`{}` needs a `name`", kind.as_str()));
        }
        if kind == ComponentKind::Apiserver && op.cluster.is_none() {
            self.error(path, "`apiserver` needs a `cluster`");
        }
        if starting && kind == ComponentKind::Agent {
            let name = op.name.clone().unwrap_or_default();
            if op.plane_id.is_some() {
                self.agents.insert(name);
            } else if !self.agents.contains(&name) {
                self.error(path, "starting a new agent needs `planeID` (only a stopped agent restarts without one)");
            }
        }
        if starting
            && kind == ComponentKind::Swarm
            && (op.count.is_none() || op.plane_id_prefix.is_none())
        {
            self.error(path, "starting a swarm needs `count` and `planeIDPrefix`");
        }
        self.component_refs(path, op);
        self.output(&op.output);
    }

    /// Bindings in a component operation's texts.
    fn component_refs(&mut self, path: &[Seg], op: &ComponentOp) {
        for text in [
            &op.plane_id,
            &op.plane_id_prefix,
            &op.name,
            &op.identity_namespace,
        ]
        .into_iter()
        .flatten()
        {
            self.check_refs(path, text, &[]);
        }
        if let Some(Count::Bound(text)) = &op.count {
            self.check_refs(&with(path, "count"), text, &[]);
        }
        for arg in &op.args {
            self.check_refs(&with(path, "args"), arg, &[]);
        }
    }

    pub(crate) fn fault(&mut self, path: &[Seg], op: &FaultOp) {
        let n_faults = [
            op.latency.is_some(),
            op.bandwidth_kbps.is_some(),
            op.blackhole,
            op.reset,
            op.slicer.is_some(),
            op.partition,
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if n_faults == 0 {
            self.error(path, "a fault needs at least one of latency, bandwidthKbps, blackhole, reset, slicer, partition");
        }
        if op.jitter.is_some() && op.latency.is_none() {
            self.error(&with(path, "jitter"), "`jitter` needs `latency`");
        }
    }

    pub(crate) fn heal(&mut self, path: &[Seg], op: &HealOp) {
        match (&op.link, op.component, &op.name) {
            (Some(_), None, None) => {}
            (None, component, Some(name)) => {
                self.replica(path, component, name);
                if !self.partitioned.contains(name) {
                    self.error(
                        &with(path, "name"),
                        format!("no earlier `partition` of `{name}` to heal"),
                    );
                }
            }
            _ => self.error(
                path,
                "give `link` (a link's faults), or `component: gateway` and `name` (a replica's partition)",
            ),
        }
    }

    pub(crate) fn partition(&mut self, path: &[Seg], op: &PartitionOp) {
        self.replica(path, Some(op.component), &op.name);
        self.partitioned.insert(op.name.clone());
    }
}
