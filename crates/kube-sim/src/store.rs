//! The object store: resources (built-in and from CRDs), objects, resourceVersions, the event
//! history that watches resume from, and the optional append-only log that makes writes durable.
//!
//! Durability (`--data-dir`): every write appends one JSON line to `objects.jsonl` and calls
//! `fdatasync` before the write is acknowledged, so an acknowledged write survives `kill -9` and
//! power loss. A torn last line (a crash mid-append) was never acknowledged and is ignored on
//! replay. On start the log is replayed (rebuilding the watch history, so watches resume across a
//! restart) and rewritten as a snapshot when it has grown much larger than the live data.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    io::{BufRead, BufReader, Write},
    ops::Bound,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{apiservices, error::ApiError};

/// How many events the history keeps for resuming watches.
pub const HISTORY_LIMIT: usize = 20_000;

/// A served resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// API group, `""` for the core group.
    pub group: String,
    /// Served version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural name (the URL segment).
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names (`cbp`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Create-only virtual resources (access and identity reviews): answered, never stored.
    pub create_only: bool,
    /// Read-only virtual resources computed on request (ComponentStatus): get and list only.
    pub read_only: bool,
    /// Whether `/status` is a subresource (status writes through the main resource are ignored).
    pub status_subresource: bool,
    /// Subresources besides `status` (`approval`, `token`, `scale`), as discovery lists them.
    pub subresources: Vec<Subresource>,
    /// A CRD version's `subresources.scale` (`specReplicasPath`, `statusReplicasPath`,
    /// `labelSelectorPath`).
    pub scale: Option<Value>,
    /// The OpenAPI v3 schema of a CRD version.
    pub schema: Option<Value>,
    /// CRD `additionalPrinterColumns`.
    pub printer_columns: Vec<Value>,
}

impl Resource {
    /// `apiVersion` of objects of this resource.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `group/plural`, the storage identity of the resource.
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            group: self.group.clone(),
            plural: self.plural.clone(),
        }
    }

    /// `Kind.group` as the API server names it in errors.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `plural.group` as the API server names it in errors.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether this resource comes from a CustomResourceDefinition.
    pub fn is_custom(&self) -> bool {
        self.schema.is_some()
    }

    /// Whether this is the core `namespaces` resource.
    pub fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    /// Whether this is `customresourcedefinitions.apiextensions.k8s.io`.
    pub fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }
}

/// A subresource other than `status`, as discovery describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subresource {
    /// The path segment after the object's name.
    pub name: String,
    /// Group of the kind it answers with.
    pub group: String,
    /// Version of the kind it answers with.
    pub version: String,
    /// The kind it answers with (`Scale`, `TokenRequest`, or the resource's own).
    pub kind: String,
    /// Verbs.
    pub verbs: Vec<&'static str>,
}

/// Identifies a resource in storage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ResourceKey {
    /// API group.
    pub group: String,
    /// Plural.
    pub plural: String,
}

/// Identifies one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ObjectKey {
    /// Resource.
    pub resource: ResourceKey,
    /// Namespace (`""` for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A change to one object, as watches see it.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    /// The object changed.
    pub key: ObjectKey,
    /// The object after the change (before, for deletions, with the deletion's version).
    pub object: Arc<Value>,
}

/// One line of the data log.
#[derive(Serialize, Deserialize)]
struct LogRecord {
    rv: u64,
    /// `None` for a snapshot header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<ObjectKey>,
    /// `None` for a deletion (or a snapshot header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object: Option<Value>,
    /// Set on the first line of a snapshot: records up to `rv` are state, not history.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    snapshot: bool,
}

/// Every object and resource of one simulated cluster.
pub struct Store {
    resources: Vec<Resource>,
    objects: BTreeMap<ObjectKey, Value>,
    rv: u64,
    history: VecDeque<WatchEvent>,
    /// The oldest resourceVersion a watch may resume from.
    compacted_rv: u64,
    events: broadcast::Sender<WatchEvent>,
    log: Option<Box<dyn DataLog>>,
}

/// Where durable writes go: one line per write, synced before the write is acknowledged.
trait DataLog: Send + Sync {
    /// Appends one record (a whole line).
    fn append(&mut self, line: &[u8]) -> std::io::Result<()>;
    /// Makes what was appended durable (`fdatasync`).
    fn sync(&mut self) -> std::io::Result<()>;
}

impl DataLog for File {
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.write_all(line)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

impl Store {
    /// A store with the built-in resources and namespaces, replaying `data_dir`'s log if any.
    pub fn open(data_dir: Option<&Path>) -> Result<Self, std::io::Error> {
        let (events, _) = broadcast::channel(65_536);
        let mut store = Store {
            resources: builtin_resources(),
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            compacted_rv: 0,
            events,
            log: None,
        };
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir)?;
            let path = log_path(dir);
            let mut records = 0;
            if path.exists() {
                records = store.replay(&path)?;
            }
            if records > 10_000 && records > 4 * store.objects.len() {
                store.write_snapshot(dir)?;
            }
            store.log = Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?,
            ));
        }
        for object in bootstrap_objects() {
            let key = ObjectKey {
                resource: ResourceKey {
                    group: object["apiVersion"]
                        .as_str()
                        .and_then(|v| v.split_once('/'))
                        .map(|(group, _)| group.to_owned())
                        .unwrap_or_default(),
                    plural: bootstrap_plural(&object).to_owned(),
                },
                namespace: object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                name: object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            };
            if !store.objects.contains_key(&key) {
                let object = store.stamp_new(object);
                store
                    .put(key, object, "ADDED")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        store
            .sync_api_services()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(store)
    }

    /// Keeps the aggregator's APIServices in step with the served group-versions: one for each
    /// (added when a CRD starts serving a version), none for a group-version no longer served.
    fn sync_api_services(&mut self) -> Result<(), ApiError> {
        let resource = ResourceKey {
            group: apiservices::GROUP.into(),
            plural: "apiservices".into(),
        };
        let now = now_rfc3339();
        let desired = apiservices::desired(&self.resources, &now);
        let stale: Vec<ObjectKey> = self
            .objects
            .iter()
            .filter(|(key, object)| {
                key.resource == resource
                    && object["metadata"]["labels"][apiservices::AUTOMANAGED].is_string()
                    && !desired.iter().any(|(name, _)| *name == key.name)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.remove(&key)?;
        }
        for (name, object) in desired {
            let key = ObjectKey {
                resource: resource.clone(),
                namespace: String::new(),
                name,
            };
            if self.objects.contains_key(&key) {
                continue;
            }
            let mut object = self.stamp_new(object);
            if let Some(meta) = object["metadata"].as_object_mut() {
                meta.remove("generation");
            }
            let mut spec_fields =
                json!({"f:groupPriorityMinimum": {}, "f:version": {}, "f:versionPriority": {}});
            if object["spec"]["group"].is_string() {
                spec_fields["f:group"] = json!({});
            }
            object["metadata"]["managedFields"] = json!([{
                "manager": "kube-apiserver", "operation": "Update",
                "apiVersion": "apiregistration.k8s.io/v1", "time": now, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, format!("f:{}", apiservices::AUTOMANAGED): {}}},
                    "f:spec": spec_fields},
            }]);
            self.put(key, object, "ADDED")?;
        }
        Ok(())
    }

    /// Replays the log; returns the number of records read.
    fn replay(&mut self, path: &Path) -> Result<usize, std::io::Error> {
        let reader = BufReader::new(File::open(path)?);
        let mut records = 0;
        let mut snapshot_rv = 0;
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            // A torn last line (a crash mid-write) was never acknowledged: stop there.
            let Ok(record) = serde_json::from_str::<LogRecord>(&line) else {
                warn!(records, "ignoring a torn record at the end of the data log");
                break;
            };
            records += 1;
            if record.snapshot {
                snapshot_rv = record.rv;
                self.history.clear();
                self.compacted_rv = record.rv;
                self.rv = self.rv.max(record.rv);
                continue;
            }
            self.rv = self.rv.max(record.rv);
            let Some(key) = record.key else { continue };
            let existed = self.objects.contains_key(&key);
            let event = match record.object {
                Some(object) => {
                    if key.resource.plural == "customresourcedefinitions" {
                        self.register_crd(&object);
                    }
                    self.objects.insert(key.clone(), object.clone());
                    (if existed { "MODIFIED" } else { "ADDED" }, Arc::new(object))
                }
                None => {
                    let Some(mut object) = self.objects.remove(&key) else {
                        continue;
                    };
                    if key.resource.plural == "customresourcedefinitions" {
                        self.unregister_crd(&key.name);
                    }
                    object["metadata"]["resourceVersion"] = json!(record.rv.to_string());
                    ("DELETED", Arc::new(object))
                }
            };
            if record.rv > snapshot_rv {
                self.push_history(WatchEvent {
                    rv: record.rv,
                    kind: event.0,
                    key,
                    object: event.1,
                });
            }
        }
        info!(
            records,
            objects = self.objects.len(),
            rv = self.rv,
            "replayed the data log"
        );
        Ok(records)
    }

    /// Rewrites the log as a snapshot of the live objects (atomically: temp file, fsync, rename).
    fn write_snapshot(&self, dir: &Path) -> Result<(), std::io::Error> {
        let tmp = dir.join("objects.jsonl.tmp");
        let mut file = std::io::BufWriter::new(File::create(&tmp)?);
        let header = LogRecord {
            rv: self.rv,
            key: None,
            object: None,
            snapshot: true,
        };
        serde_json::to_writer(&mut file, &header)?;
        file.write_all(b"\n")?;
        for (key, object) in &self.objects {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(self.rv);
            let record = LogRecord {
                rv,
                key: Some(key.clone()),
                object: Some(object.clone()),
                snapshot: false,
            };
            serde_json::to_writer(&mut file, &record)?;
            file.write_all(b"\n")?;
        }
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, log_path(dir))?;
        File::open(dir)?.sync_all()?;
        info!(
            objects = self.objects.len(),
            "compacted the data log into a snapshot"
        );
        Ok(())
    }

    /// Subscribes to every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion watches may resume from.
    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Forgets the history: watches resuming from any version handed out so far get 410 Gone.
    /// The resourceVersion moves on by one (logged, so it never goes back after a restart), so a
    /// fresh list returns a version that can be watched from.
    pub fn compact(&mut self) -> Result<(), ApiError> {
        let rv = self.rv + 1;
        self.append_log(&LogRecord {
            rv,
            key: None,
            object: None,
            snapshot: false,
        })?;
        self.rv = rv;
        self.compacted_rv = rv;
        self.history.clear();
        Ok(())
    }

    /// Events after `rv` for one resource, or `None` when `rv` was compacted away.
    pub fn events_since(&self, rv: u64, resource: &ResourceKey) -> Option<Vec<WatchEvent>> {
        if rv < self.compacted_rv {
            return None;
        }
        let start = self.history.partition_point(|event| event.rv <= rv);
        Some(
            self.history
                .range(start..)
                .filter(|event| &event.key.resource == resource)
                .cloned()
                .collect(),
        )
    }

    /// Every served resource.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Finds a resource by group, version and plural.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// Finds a resource by group and kind.
    pub fn resource_for_kind(&self, group: &str, kind: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind)
    }

    /// The key of a namespace object.
    pub fn namespace_key(&self, name: &str) -> ObjectKey {
        ObjectKey {
            resource: ResourceKey {
                group: String::new(),
                plural: "namespaces".into(),
            },
            namespace: String::new(),
            name: name.to_owned(),
        }
    }

    /// One object.
    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Every object of a resource, optionally in one namespace, in (namespace, name) order.
    pub fn list<'a>(
        &'a self,
        resource: &'a ResourceKey,
        namespace: Option<&'a str>,
    ) -> Vec<&'a Value> {
        self.list_from(resource, namespace, None)
            .map(|(_, object)| object)
            .collect()
    }

    /// Objects of a resource (optionally in one namespace) strictly after `after`, in key order.
    pub fn list_from<'a>(
        &'a self,
        resource: &'a ResourceKey,
        namespace: Option<&'a str>,
        after: Option<&ObjectKey>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Value)> + 'a {
        let start = ObjectKey {
            resource: resource.clone(),
            namespace: namespace.unwrap_or("").to_owned(),
            name: String::new(),
        };
        let lower = match after {
            Some(after) if *after >= start => Bound::Excluded(after.clone()),
            _ => Bound::Included(start),
        };
        self.objects
            .range((lower, Bound::Unbounded))
            .take_while(move |(key, _)| {
                &key.resource == resource && namespace.is_none_or(|ns| key.namespace == ns)
            })
    }

    /// Every object key in a namespace (for namespace deletion).
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<ObjectKey> {
        self.objects
            .keys()
            .filter(|key| key.namespace == namespace)
            .cloned()
            .collect()
    }

    /// Every object key of a resource.
    pub fn keys_of(&self, resource: &ResourceKey) -> Vec<ObjectKey> {
        self.list_from(resource, None, None)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Sets uid, creationTimestamp and generation on a new object.
    pub fn stamp_new(&self, mut object: Value) -> Value {
        let metadata = object["metadata"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut metadata = Value::Object(metadata);
        metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
        metadata["creationTimestamp"] = json!(now_rfc3339());
        metadata["generation"] = json!(1);
        object["metadata"] = metadata;
        object
    }

    /// Writes an object: assigns the next resourceVersion, logs, records and publishes the change.
    pub fn put(
        &mut self,
        key: ObjectKey,
        mut object: Value,
        kind: &'static str,
    ) -> Result<Value, ApiError> {
        let rv = self.rv + 1;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.append_log(&LogRecord {
            rv,
            key: Some(key.clone()),
            object: Some(object.clone()),
            snapshot: false,
        })?;
        self.rv = rv;
        let is_crd = key.resource.plural == "customresourcedefinitions";
        if is_crd {
            self.register_crd(&object);
        }
        self.objects.insert(key.clone(), object.clone());
        self.record(WatchEvent {
            rv,
            kind,
            key,
            object: Arc::new(object.clone()),
        });
        if is_crd {
            self.sync_api_services()?;
        }
        Ok(object)
    }

    /// Removes an object.
    pub fn remove(&mut self, key: &ObjectKey) -> Result<Option<Value>, ApiError> {
        let Some(mut object) = self.objects.get(key).cloned() else {
            return Ok(None);
        };
        let rv = self.rv + 1;
        self.append_log(&LogRecord {
            rv,
            key: Some(key.clone()),
            object: None,
            snapshot: false,
        })?;
        self.rv = rv;
        self.objects.remove(key);
        let is_crd = key.resource.plural == "customresourcedefinitions";
        if is_crd {
            self.unregister_crd(&key.name);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(WatchEvent {
            rv,
            kind: "DELETED",
            key: key.clone(),
            object: Arc::new(object.clone()),
        });
        if is_crd {
            self.sync_api_services()?;
        }
        Ok(Some(object))
    }

    fn push_history(&mut self, event: WatchEvent) {
        self.history.push_back(event);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
    }

    fn record(&mut self, event: WatchEvent) {
        self.push_history(event.clone());
        let _ = self.events.send(event);
    }

    fn append_log(&mut self, record: &LogRecord) -> Result<(), ApiError> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(record).map_err(|e| ApiError::internal(e.to_string()))?;
        line.push(b'\n');
        // Synced before acknowledging: an acknowledged write survives a crash of the machine,
        // not only of the process (`tests::every_write_is_synced_before_it_is_acknowledged`).
        log.append(&line)
            .and_then(|()| log.sync())
            .map_err(|e| ApiError::internal(format!("writing the data log: {e}")))
    }

    fn register_crd(&mut self, crd: &Value) {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default().to_owned();
        let names = &spec["names"];
        let plural = names["plural"].as_str().unwrap_or_default().to_owned();
        let kind = names["kind"].as_str().unwrap_or_default().to_owned();
        self.resources
            .retain(|r| !(r.group == group && r.plural == plural));
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let mut versions: Vec<&Value> = spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["served"].as_bool() != Some(false))
            .collect();
        // The storage version first: it is the group's preferred version in discovery.
        versions.sort_by_key(|v| v["storage"].as_bool() != Some(true));
        for version in versions {
            self.resources.push(Resource {
                group: group.clone(),
                version: version["name"].as_str().unwrap_or_default().to_owned(),
                kind: kind.clone(),
                plural: plural.clone(),
                singular: names["singular"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .unwrap_or_else(|| kind.to_lowercase()),
                namespaced: spec["scope"].as_str() != Some("Cluster"),
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                create_only: false,
                read_only: false,
                status_subresource: version["subresources"]["status"].is_object(),
                subresources: if version["subresources"]["scale"].is_object() {
                    vec![Subresource {
                        name: "scale".into(),
                        group: "autoscaling".into(),
                        version: "v1".into(),
                        kind: "Scale".into(),
                        verbs: vec!["get", "patch", "update"],
                    }]
                } else {
                    Vec::new()
                },
                scale: version["subresources"]["scale"]
                    .as_object()
                    .map(|scale| Value::Object(scale.clone())),
                schema: Some(
                    version["schema"]["openAPIV3Schema"]
                        .as_object()
                        .map(|o| Value::Object(o.clone()))
                        .unwrap_or_else(|| {
                            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
                        }),
                ),
                printer_columns: version["additionalPrinterColumns"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            });
        }
    }

    fn unregister_crd(&mut self, crd_name: &str) {
        if let Some((plural, group)) = crd_name.split_once('.') {
            self.resources
                .retain(|r| !(r.group == group && r.plural == plural));
            self.objects
                .retain(|key, _| !(key.resource.group == group && key.resource.plural == plural));
        }
    }
}

/// The data log of a data directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("objects.jsonl")
}

/// Now as RFC 3339 with seconds, as Kubernetes writes timestamps.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What a new cluster holds before anyone writes to it, as kube-apiserver 1.37 creates it: the
/// four namespaces, the `default/kubernetes` Service, the `cluster-admin` role bound to
/// `system:masters`, and the two system PriorityClasses.
fn bootstrap_objects() -> Vec<Value> {
    let mut objects: Vec<Value> = ["default", "kube-system", "kube-public", "kube-node-lease"]
        .into_iter()
        .map(|namespace| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {"kubernetes.io/metadata.name": namespace}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}))
        .collect();
    let rbac_defaults = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let autoupdate = json!({"rbac.authorization.kubernetes.io/autoupdate": "true"});
    objects.extend([
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
            "status": {"loadBalancer": {}}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "cluster-admin", "labels": rbac_defaults, "annotations": autoupdate},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "cluster-admin", "labels": rbac_defaults, "annotations": autoupdate},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}]}),
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": "system-cluster-critical"}, "value": 2_000_000_000,
            "preemptionPolicy": "PreemptLowerPriority",
            "description": "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary."}),
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": "system-node-critical"}, "value": 2_000_001_000,
            "preemptionPolicy": "PreemptLowerPriority",
            "description": "Used for system critical pods that must not be moved from their current node."}),
    ]);
    objects
}

/// The resource of a bootstrap object.
fn bootstrap_plural(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Namespace") => "namespaces",
        Some("Service") => "services",
        Some("ClusterRole") => "clusterroles",
        Some("ClusterRoleBinding") => "clusterrolebindings",
        _ => "priorityclasses",
    }
}

fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    status: bool,
    short: &[&str],
) -> Resource {
    Resource {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        namespaced,
        short_names: short.iter().map(|s| (*s).to_owned()).collect(),
        categories: Vec::new(),
        create_only: false,
        read_only: false,
        status_subresource: status,
        subresources: Vec::new(),
        scale: None,
        schema: None,
        printer_columns: Vec::new(),
    }
}

/// The built-in resources kube-sim stores and serves.
pub fn builtin_resources() -> Vec<Resource> {
    let mut resources = stored_builtins();
    for resource in &mut resources {
        if matches!(
            resource.plural.as_str(),
            "pods" | "services" | "deployments" | "jobs"
        ) {
            resource.categories = vec!["all".into()];
        }
        if matches!(
            resource.plural.as_str(),
            "apiservices" | "customresourcedefinitions"
        ) {
            resource.categories = vec!["api-extensions".into()];
        }
    }
    let mut csrs = builtin(
        "certificates.k8s.io",
        "v1",
        "CertificateSigningRequest",
        "certificatesigningrequests",
        false,
        true,
        &["csr"],
    );
    csrs.subresources.push(Subresource {
        name: "approval".into(),
        group: csrs.group.clone(),
        version: csrs.version.clone(),
        kind: csrs.kind.clone(),
        verbs: vec!["get", "patch", "update"],
    });
    resources.push(csrs);
    if let Some(deployments) = resources
        .iter_mut()
        .find(|r| r.group == "apps" && r.plural == "deployments")
    {
        deployments.subresources.push(Subresource {
            name: "scale".into(),
            group: "autoscaling".into(),
            version: "v1".into(),
            kind: "Scale".into(),
            verbs: vec!["get", "patch", "update"],
        });
        deployments.scale = Some(
            json!({"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}),
        );
    }
    if let Some(pods) = resources
        .iter_mut()
        .find(|r| r.group.is_empty() && r.plural == "pods")
    {
        pods.subresources.push(Subresource {
            name: "ephemeralcontainers".into(),
            group: String::new(),
            version: "v1".into(),
            kind: "Pod".into(),
            verbs: vec!["get", "patch", "update"],
        });
    }
    if let Some(accounts) = resources
        .iter_mut()
        .find(|r| r.group.is_empty() && r.plural == "serviceaccounts")
    {
        accounts.subresources.push(Subresource {
            name: "token".into(),
            group: "authentication.k8s.io".into(),
            version: "v1".into(),
            kind: "TokenRequest".into(),
            verbs: vec!["create"],
        });
    }
    for (group, kind, plural) in [
        (
            "authorization.k8s.io",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
        ),
        (
            "authorization.k8s.io",
            "SelfSubjectRulesReview",
            "selfsubjectrulesreviews",
        ),
        (
            "authentication.k8s.io",
            "SelfSubjectReview",
            "selfsubjectreviews",
        ),
        ("authentication.k8s.io", "TokenReview", "tokenreviews"),
    ] {
        let mut review = builtin(group, "v1", kind, plural, false, false, &[]);
        review.create_only = true;
        resources.push(review);
    }
    let mut statuses = builtin(
        "",
        "v1",
        "ComponentStatus",
        "componentstatuses",
        false,
        false,
        &["cs"],
    );
    statuses.read_only = true;
    resources.push(statuses);
    resources
}

fn stored_builtins() -> Vec<Resource> {
    vec![
        builtin("", "v1", "Namespace", "namespaces", false, true, &["ns"]),
        builtin("", "v1", "Secret", "secrets", true, false, &[]),
        builtin("", "v1", "ConfigMap", "configmaps", true, false, &["cm"]),
        builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            false,
            &["sa"],
        ),
        builtin("", "v1", "Event", "events", true, false, &["ev"]),
        builtin("", "v1", "Pod", "pods", true, true, &["po"]),
        builtin("", "v1", "Service", "services", true, true, &["svc"]),
        builtin("", "v1", "Node", "nodes", false, true, &["no"]),
        builtin(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
            false,
            &[],
        ),
        builtin(
            "scheduling.k8s.io",
            "v1",
            "PriorityClass",
            "priorityclasses",
            false,
            false,
            &["pc"],
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            false,
            &["ev"],
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            false,
            &[],
        ),
        builtin(
            "apps",
            "v1",
            "Deployment",
            "deployments",
            true,
            true,
            &["deploy"],
        ),
        builtin("batch", "v1", "Job", "jobs", true, true, &[]),
        builtin(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
            true,
            &["pdb"],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "Role",
            "roles",
            true,
            false,
            &[],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
            false,
            &[],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            false,
            &[],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            false,
            &[],
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            true,
            &["crd", "crds"],
        ),
        builtin(
            apiservices::GROUP,
            "v1",
            "APIService",
            "apiservices",
            false,
            true,
            &[],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A data log that records what was asked of it, and can refuse to sync.
    struct Recording {
        ops: Arc<Mutex<Vec<&'static str>>>,
        sync_fails: bool,
    }

    impl DataLog for Recording {
        fn append(&mut self, _line: &[u8]) -> std::io::Result<()> {
            self.ops.lock().unwrap().push("append");
            Ok(())
        }

        fn sync(&mut self) -> std::io::Result<()> {
            self.ops.lock().unwrap().push("sync");
            if self.sync_fails {
                return Err(std::io::Error::other("disk gone"));
            }
            Ok(())
        }
    }

    fn store_with(sync_fails: bool) -> (Store, Arc<Mutex<Vec<&'static str>>>) {
        let mut store = Store::open(None).unwrap();
        let ops = Arc::default();
        store.log = Some(Box::new(Recording {
            ops: Arc::clone(&ops),
            sync_fails,
        }));
        (store, ops)
    }

    fn namespace(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    /// `kill -9` keeps the page cache, so a process test cannot tell a synced write from an
    /// unsynced one; this can: each acknowledged write (put, remove) was appended and synced
    /// before it returned, and one whose sync failed is not acknowledged and not applied.
    #[test]
    fn every_write_is_synced_before_it_is_acknowledged() {
        let (mut store, ops) = store_with(false);
        let key = store.namespace_key("durable");
        let object = store.stamp_new(namespace("durable"));
        store.put(key.clone(), object, "ADDED").expect("put");
        assert_eq!(*ops.lock().unwrap(), ["append", "sync"]);
        store.remove(&key).expect("remove");
        assert_eq!(*ops.lock().unwrap(), ["append", "sync", "append", "sync"]);

        let (mut store, ops) = store_with(true);
        let rv = store.rv();
        let key = store.namespace_key("lost");
        let object = store.stamp_new(namespace("lost"));
        let err = store
            .put(key.clone(), object, "ADDED")
            .expect_err("not synced");
        assert!(err.to_string().contains("disk gone"), "{err}");
        assert_eq!(*ops.lock().unwrap(), ["append", "sync"]);
        assert!(
            store.get(&key).is_none(),
            "a write that was not synced is not applied"
        );
        assert_eq!(store.rv(), rv);
    }
}
