//! The object store: resources (built-in and from CRDs), objects, resourceVersions, the event
//! history that watches resume from, and the optional append-only log that makes writes durable.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;

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
    /// Whether `/status` is a subresource (status writes through the main resource are ignored).
    pub status_subresource: bool,
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
}

/// Identifies a resource in storage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    /// API group.
    pub group: String,
    /// Plural.
    pub plural: String,
}

/// Identifies one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    /// The object after the change (before, for deletions).
    pub object: Value,
}

#[derive(Serialize, Deserialize)]
struct LogRecord {
    rv: u64,
    key: ObjectKey,
    /// `None` for a deletion.
    object: Option<Value>,
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
    log: Option<File>,
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
            if path.exists() {
                store.replay(&path)?;
            }
            store.log = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?,
            );
        }
        for namespace in ["default", "kube-system", "kube-public"] {
            let key = store.namespace_key(namespace);
            if !store.objects.contains_key(&key) {
                let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
                let object = store.stamp_new(object);
                store
                    .put(key, object, "ADDED")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        // History from before a restart is not replayable: watches resume only from now on.
        store.compacted_rv = store.rv;
        store.history.clear();
        Ok(store)
    }

    fn replay(&mut self, path: &Path) -> Result<(), std::io::Error> {
        let reader = BufReader::new(File::open(path)?);
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            // A torn last line (a crash mid-write) was never acknowledged: stop there.
            let Ok(record) = serde_json::from_str::<LogRecord>(&line) else {
                break;
            };
            self.rv = self.rv.max(record.rv);
            match record.object {
                Some(object) => {
                    if record.key.resource.plural == "customresourcedefinitions" {
                        self.register_crd(&object);
                    }
                    self.objects.insert(record.key, object);
                }
                None => {
                    if record.key.resource.plural == "customresourcedefinitions" {
                        self.unregister_crd(&record.key.name);
                    }
                    self.objects.remove(&record.key);
                }
            }
        }
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

    /// Forgets the history: watches resuming from an older version get 410 Gone.
    pub fn compact(&mut self) {
        self.compacted_rv = self.rv;
        self.history.clear();
    }

    /// Events after `rv` for one resource, or `None` when `rv` was compacted away.
    pub fn events_since(&self, rv: u64, resource: &ResourceKey) -> Option<Vec<WatchEvent>> {
        if rv < self.compacted_rv {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|event| event.rv > rv && &event.key.resource == resource)
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

    /// Every object of a resource, optionally in one namespace, in name order.
    pub fn list(&self, resource: &ResourceKey, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(key, _)| {
                &key.resource == resource && namespace.is_none_or(|ns| key.namespace == ns)
            })
            .map(|(_, object)| object)
            .collect()
    }

    /// Every object key in a namespace (for namespace deletion).
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<ObjectKey> {
        self.objects
            .keys()
            .filter(|key| key.namespace == namespace)
            .cloned()
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
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.append_log(&LogRecord {
            rv: self.rv,
            key: key.clone(),
            object: Some(object.clone()),
        })?;
        if key.resource.plural == "customresourcedefinitions" {
            self.register_crd(&object);
        }
        self.objects.insert(key.clone(), object.clone());
        self.record(WatchEvent {
            rv: self.rv,
            kind,
            key,
            object: object.clone(),
        });
        Ok(object)
    }

    /// Removes an object.
    pub fn remove(&mut self, key: &ObjectKey) -> Result<Option<Value>, ApiError> {
        let Some(mut object) = self.objects.get(key).cloned() else {
            return Ok(None);
        };
        self.rv += 1;
        self.append_log(&LogRecord {
            rv: self.rv,
            key: key.clone(),
            object: None,
        })?;
        self.objects.remove(key);
        if key.resource.plural == "customresourcedefinitions" {
            self.unregister_crd(&key.name);
        }
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(WatchEvent {
            rv: self.rv,
            kind: "DELETED",
            key: key.clone(),
            object: object.clone(),
        });
        Ok(Some(object))
    }

    fn record(&mut self, event: WatchEvent) {
        self.history.push_back(event.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        let _ = self.events.send(event);
    }

    fn append_log(&mut self, record: &LogRecord) -> Result<(), ApiError> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(record).map_err(|e| ApiError::internal(e.to_string()))?;
        line.push(b'\n');
        // fsync before acknowledging: an acknowledged write survives kill -9.
        log.write_all(&line)
            .and_then(|()| log.sync_data())
            .map_err(|e| ApiError::internal(format!("writing the data log: {e}")))
    }

    fn register_crd(&mut self, crd: &Value) {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default().to_owned();
        let names = &spec["names"];
        let plural = names["plural"].as_str().unwrap_or_default().to_owned();
        self.resources
            .retain(|r| !(r.group == group && r.plural == plural));
        for version in spec["versions"].as_array().into_iter().flatten() {
            if version["served"].as_bool() == Some(false) {
                continue;
            }
            self.resources.push(Resource {
                group: group.clone(),
                version: version["name"].as_str().unwrap_or_default().to_owned(),
                kind: names["kind"].as_str().unwrap_or_default().to_owned(),
                plural: plural.clone(),
                singular: names["singular"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| names["kind"].as_str().unwrap_or_default().to_lowercase()),
                namespaced: spec["scope"].as_str() != Some("Cluster"),
                short_names: names["shortNames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect(),
                status_subresource: version["subresources"]["status"].is_object(),
                schema: Some(version["schema"]["openAPIV3Schema"].clone()),
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
        status_subresource: status,
        schema: None,
        printer_columns: Vec::new(),
    }
}

/// The built-in resources kube-sim stores and serves.
pub fn builtin_resources() -> Vec<Resource> {
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
    ]
}
