//! Who may serve what: reflectors over BuildPlanes, ClusterBuildPlanes and Secrets, and the
//! admission rule: a chain is authorised for a CR when the CR's effective planeID is the agent's
//! and the chain verifies against the CR's `clientCA`.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use buildplane_api::{BuildPlane, ClusterBuildPlane, CrKey, PlaneCr};
use buildplane_pki::ClientCaBundle;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::mpsc;
use tracing::warn;

/// The stores the gateway decides admission from (no listing per connect).
#[derive(Clone)]
pub struct Trust {
    namespaced: Store<BuildPlane>,
    cluster: Store<ClusterBuildPlane>,
    secrets: Store<Secret>,
    /// CRs the controller reported deleted (`/api/v1/planes/notify`) that the reflector may
    /// still hold, by the uid they had: admission skips them until the store catches up.
    deleted: Arc<parking_lot::Mutex<HashMap<CrKey, Option<String>>>>,
}

/// The verdict for one presented chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// CRs the chain may serve.
    pub granted: BTreeSet<CrKey>,
    /// Why each other CR with the planeID refused it.
    pub refused: Vec<(CrKey, String)>,
}

impl Trust {
    /// Starts the reflectors; `changed` receives a unit whenever any of them changes.
    pub fn start(
        client: Client,
        changed: mpsc::UnboundedSender<()>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Trust {
        let (namespaced, namespaced_writer) = reflector::store();
        let (cluster, cluster_writer) = reflector::store();
        let (secrets, secrets_writer) = reflector::store();
        spawn_reflector(
            Api::<BuildPlane>::all(client.clone()),
            namespaced_writer,
            changed.clone(),
            shutdown,
        );
        spawn_reflector(
            Api::<ClusterBuildPlane>::all(client.clone()),
            cluster_writer,
            changed.clone(),
            shutdown,
        );
        spawn_reflector(
            Api::<Secret>::all(client),
            secrets_writer,
            changed,
            shutdown,
        );
        Trust::from_stores(namespaced, cluster, secrets)
    }

    /// Trust over existing stores (tests fill them with `reflector::store::Writer`).
    pub fn from_stores(
        namespaced: Store<BuildPlane>,
        cluster: Store<ClusterBuildPlane>,
        secrets: Store<Secret>,
    ) -> Trust {
        Trust {
            namespaced,
            cluster,
            secrets,
            deleted: Arc::default(),
        }
    }

    fn uid_of(&self, key: &CrKey) -> Option<Option<String>> {
        match &key.namespace {
            Some(ns) => self
                .namespaced
                .get(&ObjectRef::new(&key.name).within(ns))
                .map(|cr| cr.metadata.uid.clone()),
            None => self
                .cluster
                .get(&ObjectRef::new(&key.name))
                .map(|cr| cr.metadata.uid.clone()),
        }
    }

    /// Treats a CR as deleted before the reflector sees the deletion (the controller said so).
    pub fn mark_deleted(&self, key: &CrKey) {
        if let Some(uid) = self.uid_of(key) {
            self.deleted.lock().insert(key.clone(), uid);
        }
    }

    /// Drops deletion marks the store has caught up with (gone, or recreated with a new uid).
    pub fn prune_deleted(&self) {
        let marks: Vec<(CrKey, Option<String>)> = self
            .deleted
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, uid) in marks {
            if self.uid_of(&key).is_none_or(|current| current != uid) {
                self.deleted.lock().remove(&key);
            }
        }
    }

    fn is_deleted(&self, key: &CrKey, uid: &Option<String>) -> bool {
        self.deleted.lock().get(key).is_some_and(|mark| mark == uid)
    }

    /// Waits until every store has its first list.
    pub async fn ready(&self) {
        let _ = self.namespaced.wait_until_ready().await;
        let _ = self.cluster.wait_until_ready().await;
        let _ = self.secrets.wait_until_ready().await;
    }

    /// Every CR (key, effective planeID).
    pub fn crs(&self) -> Vec<(CrKey, String)> {
        let mut crs: Vec<(CrKey, String)> = self
            .namespaced
            .state()
            .iter()
            .map(|cr| (cr.cr_key(), cr.effective_plane_id()))
            .collect();
        crs.extend(
            self.cluster
                .state()
                .iter()
                .map(|cr| (cr.cr_key(), cr.effective_plane_id())),
        );
        crs
    }

    /// Whether a CR exists.
    pub fn has_cr(&self, key: &CrKey) -> bool {
        match &key.namespace {
            Some(ns) => self
                .namespaced
                .get(&ObjectRef::new(&key.name).within(ns))
                .is_some(),
            None => self.cluster.get(&ObjectRef::new(&key.name)).is_some(),
        }
    }

    /// Resolves a CR's `clientCA` to PEM bytes.
    fn client_ca<K: PlaneCr>(&self, cr: &K) -> Result<Vec<u8>, String> {
        if let Some(value) = cr.client_ca().value.as_deref().filter(|v| !v.is_empty()) {
            return Ok(value.as_bytes().to_vec());
        }
        let (namespace, name, key) = cr
            .client_ca_secret()
            .ok_or("clientCA has neither value nor secretRef")?;
        // `client_ca_secret` already defaults the namespace to the CR's own; a cluster-scoped CR
        // must name one.
        let namespace =
            namespace.ok_or("clientCA.secretRef of a cluster-scoped CR must set a namespace")?;
        let secret = self
            .secrets
            .get(&ObjectRef::new(&name).within(&namespace))
            .ok_or_else(|| format!("Secret {namespace}/{name} not found"))?;
        let data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&key))
            .ok_or_else(|| format!("Secret {namespace}/{name} has no key {key:?}"))?;
        Ok(data.0.clone())
    }

    /// Admission of a chain for a planeID: every CR with that planeID whose CA verifies it.
    pub fn admit(&self, plane_id: &str, chain: &[CertificateDer<'static>]) -> Admission {
        let mut admission = Admission {
            granted: BTreeSet::new(),
            refused: Vec::new(),
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return admission;
        };
        let now = UnixTime::now();
        let mut check = |key: CrKey, ca: Result<Vec<u8>, String>| {
            let verdict = ca
                .and_then(|pem| ClientCaBundle::from_pem(&pem).map_err(|e| e.to_string()))
                .and_then(|bundle| {
                    bundle
                        .verify_client(end_entity, intermediates, now)
                        .map_err(|e| e.to_string())
                });
            match verdict {
                Ok(()) => {
                    admission.granted.insert(key);
                }
                Err(reason) => admission.refused.push((key, reason)),
            }
        };
        for cr in self
            .namespaced
            .state()
            .iter()
            .filter(|cr| cr.effective_plane_id() == plane_id)
            .filter(|cr| cr.metadata.deletion_timestamp.is_none())
            .filter(|cr| !self.is_deleted(&cr.cr_key(), &cr.metadata.uid))
        {
            check(cr.cr_key(), self.client_ca(cr.as_ref()));
        }
        for cr in self
            .cluster
            .state()
            .iter()
            .filter(|cr| cr.effective_plane_id() == plane_id)
            .filter(|cr| cr.metadata.deletion_timestamp.is_none())
            .filter(|cr| !self.is_deleted(&cr.cr_key(), &cr.metadata.uid))
        {
            check(cr.cr_key(), self.client_ca(cr.as_ref()));
        }
        admission
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: mpsc::UnboundedSender<()>,
    shutdown: &tokio_util::sync::CancellationToken,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    crate::spawn_until(shutdown, async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .touched_objects();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(object) => {
                    tracing::trace!(name = %object.name_any(), "trust source changed");
                    let _ = changed.send(());
                }
                Err(err) => warn!(%err, "watch of a trust source failed; retrying"),
            }
        }
    });
}
