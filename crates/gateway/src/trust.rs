//! Who may serve what: reflectors over BuildPlanes and ClusterBuildPlanes, the data of the
//! Secrets they name (`secrets`), and the admission rule: a chain is authorised for a CR when the CR's effective planeID is the agent's
//! and the chain verifies against the CR's `clientCA`.

mod secrets;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use buildplane_api::{BuildPlane, ClusterBuildPlane, CrKey, PlaneCr, served::ServedCrs};
use buildplane_pki::{CaId, ClientCaBundle, VerdictCache, VerdictStats};
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

use secrets::References;
pub use secrets::SecretCache;

/// The stores the gateway decides admission from (no listing per connect).
#[derive(Clone)]
pub struct Trust {
    namespaced: Store<BuildPlane>,
    cluster: Store<ClusterBuildPlane>,
    secrets: SecretCache,
    /// CRs the controller reported deleted (`/api/v1/planes/notify`) that the reflector may
    /// still hold, by the uid they had: admission skips them until the store catches up.
    deleted: Arc<parking_lot::Mutex<HashMap<CrKey, Option<String>>>>,
    /// planeID → the CRs last seen with it, fed by the reflectors' events, so admitting one
    /// agent looks at its plane's CRs instead of scanning every CR (10,000 CRs made a storm
    /// quadratic). A hint only: each key is looked up in the store and its planeID checked
    /// again. `None` over bare stores (tests), which scan.
    planes: Option<PlaneIndex>,
    /// Verdicts by (presented chain, clientCA bundle): a relist, a Secret rewritten with the
    /// same data, an agent reconnecting with the same leaf, or a plane whose other CR changed
    /// re-verifies from memory. A verdict holds only while no certificate involved crosses a
    /// validity boundary (`buildplane_pki::VerdictCache`).
    verdicts: Arc<VerdictCache>,
}

type PlaneIndex = Arc<parking_lot::RwLock<Planes>>;

/// A Secret by namespace and name.
type SecretRef = (String, String);

/// planeID → CR keys, and each key's planeID (so a move leaves nothing behind); Secret → the CRs
/// whose `clientCA.secretRef` names it (so a Secret change re-verifies only their planes, and
/// any other Secret's change costs nothing).
#[derive(Default)]
struct Planes {
    by_plane: HashMap<String, HashSet<CrKey>>,
    plane_of: HashMap<CrKey, String>,
    by_secret: HashMap<SecretRef, HashSet<CrKey>>,
    secret_of: HashMap<CrKey, SecretRef>,
}

impl Planes {
    /// Forgets a CR; returns the planeID it had.
    fn forget(&mut self, key: &CrKey) -> Option<String> {
        if let Some(secret) = self.secret_of.remove(key)
            && let Some(keys) = self.by_secret.get_mut(&secret)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_secret.remove(&secret);
            }
        }
        let plane = self.plane_of.remove(key)?;
        if let Some(keys) = self.by_plane.get_mut(&plane) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_plane.remove(&plane);
            }
        }
        Some(plane)
    }

    /// Records a CR's planeID and Secret; returns the planeID it had before.
    fn set(&mut self, key: CrKey, plane: String, secret: Option<SecretRef>) -> Option<String> {
        let before = self.forget(&key);
        self.by_plane
            .entry(plane.clone())
            .or_default()
            .insert(key.clone());
        if let Some(secret) = secret {
            self.by_secret
                .entry(secret.clone())
                .or_default()
                .insert(key.clone());
            self.secret_of.insert(key.clone(), secret);
        }
        self.plane_of.insert(key, plane);
        before
    }

    /// Whether any CR names `secret`.
    fn is_named(&self, secret: &SecretRef) -> bool {
        self.by_secret.contains_key(secret)
    }

    /// The planeIDs of the CRs that read `secret`.
    fn planes_reading(&self, secret: &SecretRef) -> BTreeSet<String> {
        self.by_secret
            .get(secret)
            .into_iter()
            .flatten()
            .filter_map(|key| self.plane_of.get(key).cloned())
            .collect()
    }
}

/// What a change of the trust sources may have changed: the verdicts of some planes'
/// connections, or (a relist) of all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustChange {
    /// Connections on these planeIDs.
    Planes(BTreeSet<String>),
    /// Every connection.
    All,
}

impl TrustChange {
    /// Both changes at once.
    pub fn merge(self, other: TrustChange) -> TrustChange {
        match (self, other) {
            (TrustChange::Planes(mut a), TrustChange::Planes(b)) => {
                a.extend(b);
                TrustChange::Planes(a)
            }
            _ => TrustChange::All,
        }
    }
}

/// The verdict for one presented chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// CRs the chain may serve.
    pub granted: BTreeSet<CrKey>,
    /// Why each other CR with the planeID refused it.
    pub refused: Vec<(CrKey, String)>,
    /// The clientCAs that verified it (the caps per CA count by them).
    pub cas: BTreeSet<CaId>,
}

impl Trust {
    /// Starts the reflectors; `changed` receives a unit whenever any of them changes.
    pub fn start(
        client: Client,
        changed: mpsc::UnboundedSender<TrustChange>,
        tasks: &mut buildplane_runtime::Tasks,
    ) -> Trust {
        let (namespaced, namespaced_writer) = reflector::store();
        let (cluster, cluster_writer) = reflector::store();
        let (secrets, secrets_ready) = SecretCache::new();
        let (fetch, fetches) = mpsc::unbounded_channel();
        let references = References {
            cache: secrets.clone(),
            fetch,
        };
        let planes = PlaneIndex::default();
        spawn_reflector(
            Api::<BuildPlane>::all(client.clone()),
            namespaced_writer,
            changed.clone(),
            tasks,
            index_plane::<BuildPlane>(&planes, Some(references.clone())),
        );
        spawn_reflector(
            Api::<ClusterBuildPlane>::all(client.clone()),
            cluster_writer,
            changed.clone(),
            tasks,
            index_plane::<ClusterBuildPlane>(&planes, Some(references)),
        );
        secrets::spawn_watch(
            Api::<Secret>::all(client.clone()),
            secrets.clone(),
            secrets_ready,
            planes.clone(),
            changed.clone(),
            tasks,
        );
        secrets::spawn_fetcher(
            client,
            secrets.clone(),
            planes.clone(),
            fetches,
            changed,
            tasks,
        );
        Trust {
            planes: Some(planes),
            ..Trust::from_stores(namespaced, cluster, secrets)
        }
    }

    /// Trust over existing stores (tests fill them with `reflector::store::Writer`).
    pub fn from_stores(
        namespaced: Store<BuildPlane>,
        cluster: Store<ClusterBuildPlane>,
        secrets: SecretCache,
    ) -> Trust {
        Trust {
            namespaced,
            cluster,
            secrets,
            deleted: Arc::default(),
            planes: None,
            verdicts: Arc::default(),
        }
    }

    /// This trust with a verdict cache of `capacity` entries (0: every verification runs).
    pub fn with_verdict_cache(self, capacity: usize) -> Trust {
        Trust {
            verdicts: Arc::new(VerdictCache::with_capacity(capacity)),
            ..self
        }
    }

    /// Hits, misses and entries of the verdict cache.
    pub fn verdict_stats(&self) -> VerdictStats {
        self.verdicts.stats()
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
        self.secrets.ready().await;
    }

    /// How many Secrets' data it holds (those CRs name).
    pub fn cached_secrets(&self) -> usize {
        self.secrets.len()
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
        self.secrets.value(&(namespace, name), &key)
    }

    /// Admission of a chain for a planeID: every CR with that planeID that the agent serves and
    /// whose CA verifies it.
    pub fn admit(
        &self,
        plane_id: &str,
        chain: &[CertificateDer<'static>],
        served: &ServedCrs,
    ) -> Admission {
        self.index(Some(plane_id)).admit(plane_id, chain, served)
    }

    /// The CRs (of one planeID, or all) that may admit agents, with their CA bundles parsed
    /// once: revalidating many connections costs one pass over the stores, not one per
    /// connection.
    pub fn index(&self, plane_id: Option<&str>) -> TrustIndex {
        let mut index = TrustIndex {
            by_plane: HashMap::new(),
            verdicts: self.verdicts.clone(),
        };
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
        if let (Some(plane_id), Some(planes)) = (plane_id, &self.planes) {
            let keys: Vec<CrKey> = planes
                .read()
                .by_plane
                .get(plane_id)
                .map(|keys| keys.iter().cloned().collect())
                .unwrap_or_default();
            // A key may be stale (the CR was deleted while the watch was down, and the relist
            // has no event for it): the store and the CR's current planeID decide.
            for key in keys {
                if self.current_plane_id(&key).as_deref() == Some(plane_id)
                    && let Some((key, ca)) = self.admitting(&key)
                {
                    add(key, plane_id.to_owned(), ca);
                }
            }
            return index;
        }
        // A full pass (revalidation, or bare stores): compare in place,
        // allocating only for the CRs that match.
        let wanted = |plane: Option<&str>| match (plane_id, plane) {
            (None, _) => true,
            (Some(p), Some(plane)) => p == plane,
            (Some(_), None) => false,
        };
        for cr in self.namespaced.state() {
            let plane = cr
                .spec
                .plane_id
                .as_deref()
                .filter(|id| !id.is_empty())
                .or(cr.metadata.name.as_deref());
            if wanted(plane) && self.may_admit(cr.as_ref()) {
                add(
                    cr.cr_key(),
                    cr.effective_plane_id(),
                    self.client_ca(cr.as_ref()),
                );
            }
        }
        for cr in self.cluster.state() {
            if wanted(Some(&cr.spec.plane_id)) && self.may_admit(cr.as_ref()) {
                add(
                    cr.cr_key(),
                    cr.effective_plane_id(),
                    self.client_ca(cr.as_ref()),
                );
            }
        }
        index
    }

    /// The effective planeID of the CR `key` in the store, if it is there.
    fn current_plane_id(&self, key: &CrKey) -> Option<String> {
        match &key.namespace {
            Some(ns) => self
                .namespaced
                .get(&ObjectRef::new(&key.name).within(ns))
                .map(|cr| cr.effective_plane_id()),
            None => self
                .cluster
                .get(&ObjectRef::new(&key.name))
                .map(|cr| cr.effective_plane_id()),
        }
    }

    /// The CR `key` with its `clientCA`, if it may admit agents.
    fn admitting(&self, key: &CrKey) -> Option<(CrKey, Result<Vec<u8>, String>)> {
        match &key.namespace {
            Some(ns) => {
                let cr = self.namespaced.get(&ObjectRef::new(&key.name).within(ns))?;
                self.may_admit(cr.as_ref())
                    .then(|| (cr.cr_key(), self.client_ca(cr.as_ref())))
            }
            None => {
                let cr = self.cluster.get(&ObjectRef::new(&key.name))?;
                self.may_admit(cr.as_ref())
                    .then(|| (cr.cr_key(), self.client_ca(cr.as_ref())))
            }
        }
    }

    /// Not being deleted, and not reported deleted by the controller.
    fn may_admit<K: PlaneCr>(&self, cr: &K) -> bool {
        cr.meta().deletion_timestamp.is_none() && !self.is_deleted(&cr.cr_key(), &cr.meta().uid)
    }
}

/// The reason a CR the agent's `--serve` list leaves out is refused.
pub const NOT_SERVED: &str = "not among the CRs the agent serves (its --serve list)";

/// A CR's parsed `clientCA`, or why it cannot be used.
type CaVerdict = Result<Arc<ClientCaBundle>, String>;

/// The admitting CRs by planeID at one moment (see [`Trust::index`]).
pub struct TrustIndex {
    by_plane: HashMap<String, Vec<(CrKey, CaVerdict)>>,
    verdicts: Arc<VerdictCache>,
}

impl TrustIndex {
    /// Admission of a chain for a planeID: every CR with that planeID that the agent serves
    /// (its `--serve` list) and whose CA verifies it. A CR the agent does not serve is refused
    /// before its CA is consulted, so a copy of the agent's public CA in another tenant's CR
    /// gains nothing.
    pub fn admit(
        &self,
        plane_id: &str,
        chain: &[CertificateDer<'static>],
        served: &ServedCrs,
    ) -> Admission {
        let mut admission = Admission {
            granted: BTreeSet::new(),
            refused: Vec::new(),
            cas: BTreeSet::new(),
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return admission;
        };
        let now = UnixTime::now();
        for (key, bundle) in self.by_plane.get(plane_id).into_iter().flatten() {
            if !served.allows(key) {
                admission.refused.push((key.clone(), NOT_SERVED.to_owned()));
                continue;
            }
            let verdict = bundle.as_ref().map_err(Clone::clone).and_then(|bundle| {
                self.verdicts
                    .verify(bundle, end_entity, intermediates, now)
                    .map_err(|e| e.to_string())
            });
            match verdict {
                Ok(ca) => {
                    admission.granted.insert(key.clone());
                    admission.cas.insert(ca);
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
    changed: mpsc::UnboundedSender<TrustChange>,
    tasks: &mut buildplane_runtime::Tasks,
    on_touched: impl Fn(&K, bool) -> Option<TrustChange> + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let name = format!("watch of {}", K::plural(&()));
    tasks.spawn(name, async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                    tracing::trace!(name = %object.name_any(), "trust source changed");
                    on_touched(&object, false)
                }
                Ok(watcher::Event::Delete(object)) => {
                    tracing::trace!(name = %object.name_any(), "trust source deleted");
                    on_touched(&object, true)
                }
                Ok(watcher::Event::Init) => None,
                // The store swaps in the relisted objects only now, and a relist may have
                // missed deletions: everything is decided again.
                Ok(watcher::Event::InitDone) => Some(TrustChange::All),
                Err(err) => {
                    warn!(%err, "watch of a trust source failed; retrying");
                    None
                }
            };
            if let Some(change) = change {
                let _ = changed.send(change);
            }
        }
    });
}

/// Keeps the planeID and Secret index of one plane kind current from its watch events; a change
/// affects the plane the CR was on and the plane it is on now.
fn index_plane<K: PlaneCr>(
    planes: &PlaneIndex,
    references: Option<References>,
) -> impl Fn(&K, bool) -> Option<TrustChange> + Send + 'static {
    let planes = planes.clone();
    move |cr: &K, deleted: bool| {
        let key = cr.cr_key();
        let mut planes = planes.write();
        let named_before = planes.secret_of.get(&key).cloned();
        let mut affected = BTreeSet::new();
        if deleted {
            affected.extend(planes.forget(&key));
        } else {
            let plane = cr.effective_plane_id();
            let secret = cr
                .client_ca_secret()
                .and_then(|(namespace, name, _)| Some((namespace?, name)));
            affected.extend(planes.set(key.clone(), plane.clone(), secret));
            affected.insert(plane);
        }
        if let Some(references) = &references {
            let named_now = planes.secret_of.get(&key).cloned();
            references.moved(named_before, named_now, |secret| planes.is_named(secret));
        }
        Some(TrustChange::Planes(affected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buildplane_api::{BuildPlaneSpec, ClusterAgentConfig, ValueFrom};
    use buildplane_pki::Ca;
    use kube::runtime::watcher::Event;

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    fn build_plane(name: &str, plane: &str, ca_pem: &str) -> BuildPlane {
        let mut cr = BuildPlane::new(
            name,
            BuildPlaneSpec {
                plane_id: Some(plane.into()),
                cluster_agent: ClusterAgentConfig {
                    client_ca: ValueFrom {
                        secret_ref: None,
                        value: Some(ca_pem.into()),
                    },
                },
                secret_store_ref: None,
                observability_plane_ref: None,
            },
        );
        cr.metadata.namespace = Some("org".into());
        cr.metadata.uid = Some(format!("uid-{name}"));
        cr
    }

    /// Admission through the planeID index (what `Trust::start` uses) follows the watch events:
    /// a CR that moves to another planeID or is deleted stops admitting on its old plane, and
    /// the answer always equals a full scan of the store.
    #[test]
    fn the_plane_index_follows_moves_and_deletions() {
        let (namespaced, mut writer) = reflector::store::<BuildPlane>();
        let (cluster, _cluster_writer) = reflector::store::<ClusterBuildPlane>();
        let secrets = SecretCache::holding([]);
        let planes = PlaneIndex::default();
        let indexed = Trust {
            planes: Some(planes.clone()),
            ..Trust::from_stores(namespaced.clone(), cluster.clone(), secrets.clone())
        };
        let scanned = Trust::from_stores(namespaced, cluster, secrets);
        let on_event = index_plane::<BuildPlane>(&planes, None);
        let mut apply = |event: Event<BuildPlane>| {
            writer.apply_watcher_event(&event);
            match &event {
                Event::Apply(cr) | Event::InitApply(cr) => drop(on_event(cr, false)),
                Event::Delete(cr) => drop(on_event(cr, true)),
                Event::Init | Event::InitDone => {}
            }
        };
        let ca = Ca::generate("agent-ca", DAY).unwrap();
        let leaf = ca.issue_client("p1", DAY).unwrap();
        let chain = buildplane_pki::parse_cert_bundle(leaf.cert_pem.as_bytes()).unwrap();
        let granted = |trust: &Trust, plane: &str| -> Vec<String> {
            trust
                .admit(plane, &chain, &ServedCrs::any())
                .granted
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let both = |plane: &str| {
            let (a, b) = (granted(&indexed, plane), granted(&scanned, plane));
            assert_eq!(a, b, "index and scan agree on {plane}");
            a
        };

        // The initial list: the store has the objects only at InitDone.
        apply(Event::Init);
        apply(Event::InitApply(build_plane("a", "p1", ca.cert_pem())));
        apply(Event::InitApply(build_plane("b", "p1", ca.cert_pem())));
        apply(Event::InitDone);
        assert_eq!(both("p1"), ["org/a", "org/b"]);
        assert!(both("p2").is_empty());

        apply(Event::Apply(build_plane("a", "p2", ca.cert_pem())));
        assert_eq!(both("p1"), ["org/b"]);
        assert_eq!(both("p2"), ["org/a"]);

        apply(Event::Delete(build_plane("b", "p1", ca.cert_pem())));
        assert!(both("p1").is_empty());
        assert!(
            !planes.read().by_plane.contains_key("p1"),
            "moved and deleted CRs leave nothing on their old plane"
        );

        // A relist that no longer has `a` (deleted while the watch was down): the stale key
        // is ignored because the store decides.
        apply(Event::Init);
        apply(Event::InitDone);
        assert!(both("p2").is_empty());
    }

    /// The second admission of the same chain against the same CR is answered from the verdict
    /// cache; once the CR's clientCA names another CA the same chain is refused (the new bundle
    /// is another key), and a return to the first CA is answered from the cache again.
    #[test]
    fn verdicts_are_remembered_per_bundle() {
        let (namespaced, mut writer) = reflector::store::<BuildPlane>();
        let (cluster, _cluster_writer) = reflector::store::<ClusterBuildPlane>();
        let trust = Trust::from_stores(namespaced, cluster, SecretCache::holding([]));
        let ca = Ca::generate("agent-ca", DAY).unwrap();
        let other = Ca::generate("other-ca", DAY).unwrap();
        let leaf = ca.issue_client("p1", DAY).unwrap();
        let chain = buildplane_pki::parse_cert_bundle(leaf.cert_pem.as_bytes()).unwrap();
        let mut set_ca = |pem: &str| {
            writer.apply_watcher_event(&Event::Apply(build_plane("a", "p1", pem)));
        };
        let admitted = |trust: &Trust| {
            !trust
                .admit("p1", &chain, &ServedCrs::any())
                .granted
                .is_empty()
        };

        set_ca(ca.cert_pem());
        assert!(admitted(&trust));
        assert!(admitted(&trust));
        let stats = trust.verdict_stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));

        set_ca(other.cert_pem());
        assert!(
            !admitted(&trust),
            "a verdict of the old bundle never answers for the new one"
        );
        set_ca(ca.cert_pem());
        assert!(admitted(&trust));
        let stats = trust.verdict_stats();
        assert_eq!((stats.hits, stats.misses), (2, 2));
    }
}
