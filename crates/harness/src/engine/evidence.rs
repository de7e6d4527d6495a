//! Evidence and cleanup: what a failed scenario leaves in its report, the end of background
//! work, and the deletion of everything the scenario created.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{APPLY_CONCURRENCY, Created, Engine, POLL, yaml};
use crate::kube_ops::{Kube, ObjectRef};
use crate::result::{Evidence, LoadReport, Series};

impl Engine {
    /// Collects evidence: logs, the gateway's connections, events and the created objects.
    pub async fn evidence(&self) -> Evidence {
        let mut evidence = Evidence {
            logs: self.env.logs(60),
            ..Evidence::default()
        };
        evidence.connections = self.connections_evidence().await;
        let events = self.events_evidence().await;
        if !events.is_empty() {
            evidence.events = Some(events);
        }
        for created in self.created.iter().rev().take(20) {
            let Ok(kube) = self.kube(created.cluster).await else {
                continue;
            };
            let dump = match kube.get(&created.reference).await {
                Ok(Some(object)) => yaml(&object),
                Ok(None) => "gone".into(),
                Err(err) => format!("unreadable: {err}"),
            };
            evidence.objects.insert(
                format!("{} {}", created.cluster.as_str(), created.reference),
                dump,
            );
        }
        evidence
    }

    /// The gateway's `/api/v1/connections`, when the environment has a gateway.
    async fn connections_evidence(&self) -> Option<String> {
        let gateway = self.env.gateway().ok()?;
        let url = format!("{}/api/v1/connections", gateway.base_url);
        Some(
            match gateway
                .client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(res) => {
                    let status = res.status();
                    let text = res.text().await.unwrap_or_default();
                    match serde_json::from_str::<Value>(&text) {
                        Ok(json) => format!("{status}\n{}", yaml(&json)),
                        Err(_) => format!("{status}\n{text}"),
                    }
                }
                Err(err) => format!("unreachable: {err}"),
            },
        )
    }

    /// The events of the scenario's namespaces, one line each.
    async fn events_evidence(&self) -> String {
        let mut events = String::new();
        for (cluster, namespace) in &self.namespaces {
            let Ok(kube) = self.kube(*cluster).await else {
                continue;
            };
            // Core events and events.k8s.io (what kube-runtime's Recorder writes).
            for (api_version, object, message) in [
                ("v1", "involvedObject", "message"),
                ("events.k8s.io/v1", "regarding", "note"),
            ] {
                let reference = ObjectRef {
                    api_version: api_version.into(),
                    kind: "Event".into(),
                    namespace: Some(namespace.clone()),
                    name: None,
                };
                let Ok(items) = kube.list(&reference, "").await else {
                    continue;
                };
                for item in items {
                    let field = |p: &str| {
                        item.pointer(p)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string()
                    };
                    events.push_str(&format!(
                        "{} {}/{} {} {}: {}\n",
                        cluster.as_str(),
                        field(&format!("/{object}/kind")),
                        field(&format!("/{object}/name")),
                        field("/type"),
                        field("/reason"),
                        field(&format!("/{message}"))
                    ));
                }
            }
        }
        events
    }

    /// Stops samplers and background work, and returns the series and load reports.
    pub fn finish(&mut self) -> (Vec<Series>, Vec<LoadReport>) {
        for sampler in self.samplers.drain(..) {
            sampler.abort();
        }
        for (_, background) in self.backgrounds.drain() {
            if let Some(stop) = background.stop {
                let _ = stop.send(true);
            }
            background.handle.abort();
        }
        let series = self
            .series
            .iter()
            .map(|(name, points)| Series {
                name: name.clone(),
                points: points.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            })
            .collect();
        let loads = std::mem::take(&mut *self.loads.lock().unwrap_or_else(|e| e.into_inner()));
        (series, loads)
    }

    /// Deletes what the scenario created, newest first, waiting until each is gone.
    ///
    /// Consecutive objects of one kind on one cluster (a `forEach` of 1,000 BuildPlanes) are
    /// deleted together; groups are deleted in reverse order of creation.
    pub async fn cleanup(&mut self, timeout: Duration) -> Result<(), String> {
        let mut errors = Vec::new();
        let created = std::mem::take(&mut self.created);
        for group in groups(created) {
            let cluster = group[0].cluster;
            let kube = match self.kube(cluster).await {
                Ok(kube) => kube,
                Err(failure) => {
                    errors.push(failure.message);
                    continue;
                }
            };
            errors.extend(delete_group(&kube, group, timeout).await);
        }
        let namespaces = std::mem::take(&mut self.namespaces);
        for (cluster, namespace) in namespaces.into_iter().rev() {
            let value =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            if let Err(failure) = self.delete(cluster, vec![value], false, timeout).await {
                errors.push(failure.message);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Created objects, newest first, in groups of consecutive objects of one kind on one cluster.
fn groups(created: Vec<Created>) -> Vec<Vec<Created>> {
    let mut groups: Vec<Vec<Created>> = Vec::new();
    for item in created.into_iter().rev() {
        match groups.last_mut() {
            Some(group)
                if group[0].cluster == item.cluster
                    && group[0].reference.kind == item.reference.kind
                    && group[0].reference.api_version == item.reference.api_version =>
            {
                group.push(item)
            }
            _ => groups.push(vec![item]),
        }
    }
    groups
}

/// Deletes one group and waits until it is gone; returns what went wrong.
async fn delete_group(kube: &Kube, group: Vec<Created>, timeout: Duration) -> Vec<String> {
    let mut errors = Vec::new();
    // Every deletion is issued before any is awaited, so finalizers of a large group
    // (a storm's thousand BuildPlanes) run side by side, not sixteen at a time.
    let deadline = Instant::now() + timeout;
    let deleted: Vec<Result<ObjectRef, String>> =
        futures::stream::iter(group.into_iter().map(|item| async move {
            match kube.delete(&item.reference).await {
                Ok(_) => Ok(item.reference),
                Err(e) => Err(format!("deleting {}: {e}", item.reference)),
            }
        }))
        .buffer_unordered(APPLY_CONCURRENCY)
        .collect()
        .await;
    let mut pending = Vec::new();
    for result in deleted {
        match result {
            Ok(reference) => pending.push(reference),
            Err(err) => errors.push(err),
        }
    }
    let results: Vec<Result<(), String>> = futures::stream::iter(
        pending
            .into_iter()
            .map(|reference| async move { wait_gone(kube, &reference, deadline, timeout).await }),
    )
    .buffer_unordered(APPLY_CONCURRENCY)
    .collect()
    .await;
    errors.extend(results.into_iter().filter_map(Result::err));
    errors
}

/// Waits until a deleted object is gone (finalizers done), until `deadline`.
async fn wait_gone(
    kube: &Kube,
    reference: &ObjectRef,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), String> {
    loop {
        match kube.get(reference).await {
            Ok(None) => return Ok(()),
            Ok(Some(found)) if Instant::now() >= deadline => {
                let finalizers = found
                    .pointer("/metadata/finalizers")
                    .map(|f| f.to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "{reference} still exists {} after deletion (finalizers {finalizers})",
                    crate::duration::pretty(timeout)
                ));
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(format!("reading {reference}: {err}"));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}
