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
        self.index(Some(plane_id)).admit(plane_id, chain)
    }

    /// The CRs (of one planeID, or all) that may admit agents, with their CA bundles parsed
    /// once: revalidating many connections costs one pass over the stores, not one per
    /// connection.
    pub fn index(&self, plane_id: Option<&str>) -> TrustIndex {
        let mut index = TrustIndex::default();
        let mut parsed: HashMap<Vec<u8>, CaVerdict> = HashMap::new();
        let mut add = |key: CrKey, plane: String, ca: Result<Vec<u8>, String>| {
            let bundle = ca.and_then(|pem| {
                parsed
                    .entry(pem)
                    .or_insert_with_key(|pem| {
                        ClientCaBundle::from_pem(pem)
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    })
                    .clone()
            });
            index.by_plane.entry(plane).or_default().push((key, bundle));
        };
        let wanted = |plane: &str| plane_id.is_none_or(|p| p == plane);
        for cr in self.namespaced.state() {
            let plane = cr.effective_plane_id();
            if wanted(&plane) && self.may_admit(cr.as_ref()) {
                add(cr.cr_key(), plane, self.client_ca(cr.as_ref()));
            }
        }
        for cr in self.cluster.state() {
            let plane = cr.effective_plane_id();
            if wanted(&plane) && self.may_admit(cr.as_ref()) {
                add(cr.cr_key(), plane, self.client_ca(cr.as_ref()));
            }
        }
        index
    }

    /// Not being deleted, and not reported deleted by the controller.
    fn may_admit<K: PlaneCr>(&self, cr: &K) -> bool {
        cr.meta().deletion_timestamp.is_none() && !self.is_deleted(&cr.cr_key(), &cr.meta().uid)
    }
}

/// A CR's parsed `clientCA`, or why it cannot be used.
type CaVerdict = Result<Arc<ClientCaBundle>, String>;

/// The admitting CRs by planeID at one moment (see [`Trust::index`]).
#[derive(Default)]
pub struct TrustIndex {
    by_plane: HashMap<String, Vec<(CrKey, CaVerdict)>>,
}

impl TrustIndex {
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
        for (key, bundle) in self.by_plane.get(plane_id).into_iter().flatten() {
            let verdict = bundle.as_ref().map_err(Clone::clone).and_then(|bundle| {
                bundle
                    .verify_client(end_entity, intermediates, now)
                    .map_err(|e| e.to_string())
            });
            match verdict {
                Ok(()) => {
                    admission.granted.insert(key.clone());
                }
                Err(reason) => admission.refused.push((key.clone(), reason)),
            }
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
