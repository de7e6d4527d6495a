//! Kubernetes operations on untyped objects (kube-rs dynamic API with discovery per kind).

use std::collections::HashMap;
use std::sync::Mutex;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use serde_json::Value;

use crate::backend::ClusterAccess;

/// Errors of Kubernetes operations.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig could not be loaded.
    #[error("kubeconfig {path} (context {context}): {message}")]
    Config {
        /// The file.
        path: String,
        /// The context.
        context: String,
        /// Why.
        message: String,
    },
    /// The object lacks apiVersion, kind or name.
    #[error("object needs {0}")]
    Malformed(&'static str),
    /// The API server answered with an error status.
    #[error("{code} {reason}: {message}")]
    Api {
        /// HTTP code.
        code: u16,
        /// Kubernetes reason.
        reason: String,
        /// Message.
        message: String,
    },
    /// Transport or other client errors.
    #[error("{0}")]
    Client(String),
}

impl KubeError {
    /// The HTTP code of an API error.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<kube::Error> for KubeError {
    fn from(err: kube::Error) -> KubeError {
        match err {
            kube::Error::Api(status) => KubeError::Api {
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => KubeError::Client(other.to_string()),
        }
    }
}

/// A client for one cluster, with a discovery cache.
pub struct Kube {
    /// The kube-rs client.
    pub client: kube::Client,
    cache: Mutex<HashMap<(String, String), (ApiResource, ApiCapabilities)>>,
}

/// Builds a kube-rs client for a cluster.
pub async fn client(access: &ClusterAccess) -> Result<Kube, KubeError> {
    let err = |message: String| KubeError::Config {
        path: access.kubeconfig.display().to_string(),
        context: access.context.clone(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(&access.kubeconfig).map_err(|e| err(e.to_string()))?;
    let options = KubeConfigOptions {
        context: Some(access.context.clone()),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| err(e.to_string()))?;
    let client = kube::Client::try_from(config).map_err(|e| err(e.to_string()))?;
    Ok(Kube {
        client,
        cache: Mutex::new(HashMap::new()),
    })
}

/// apiVersion, kind, namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// `group/version` or `v1`.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name; `None` lists.
    pub name: Option<String>,
}

impl ObjectRef {
    /// Reads the reference out of an object.
    pub fn of(value: &Value) -> Result<ObjectRef, KubeError> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        Ok(ObjectRef {
            api_version: text(value.get("apiVersion")).ok_or(KubeError::Malformed("apiVersion"))?,
            kind: text(value.get("kind")).ok_or(KubeError::Malformed("kind"))?,
            namespace: text(value.pointer("/metadata/namespace")),
            name: text(value.pointer("/metadata/name")),
        })
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        match (&self.namespace, &self.name) {
            (Some(ns), Some(name)) => write!(f, " {ns}/{name}"),
            (None, Some(name)) => write!(f, " {name}"),
            (Some(ns), None) => write!(f, " in {ns}"),
            (None, None) => Ok(()),
        }
    }
}

impl Kube {
    async fn resource(
        &self,
        reference: &ObjectRef,
    ) -> Result<(ApiResource, ApiCapabilities), KubeError> {
        let key = (reference.api_version.clone(), reference.kind.clone());
        if let Some(found) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(found.clone());
        }
        let (group, version) = match reference.api_version.split_once('/') {
            Some((group, version)) => (group.to_string(), version.to_string()),
            None => (String::new(), reference.api_version.clone()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &reference.kind);
        let found = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, found.clone());
        Ok(found)
    }

    /// The dynamic API for a reference, and whether the kind is namespaced.
    pub async fn api(
        &self,
        reference: &ObjectRef,
    ) -> Result<(Api<DynamicObject>, bool), KubeError> {
        let (resource, capabilities) = self.resource(reference).await?;
        let namespaced = capabilities.scope == Scope::Namespaced;
        let api = match (&reference.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &resource),
            (None, true) if reference.name.is_some() => {
                Api::default_namespaced_with(self.client.clone(), &resource)
            }
            _ => Api::all_with(self.client.clone(), &resource),
        };
        Ok((api, namespaced))
    }

    /// Creates an object.
    pub async fn create(&self, value: &Value) -> Result<Value, KubeError> {
        let reference = ObjectRef::of(value)?;
        let (api, _) = self.api(&reference).await?;
        let object: DynamicObject =
            serde_json::from_value(value.clone()).map_err(|e| KubeError::Client(e.to_string()))?;
        let created = api.create(&PostParams::default(), &object).await?;
        serde_json::to_value(created).map_err(|e| KubeError::Client(e.to_string()))
    }

    /// Merge-patches an existing object (and its status subresource when `status` is given).
    pub async fn patch(&self, value: &Value) -> Result<Value, KubeError> {
        let reference = ObjectRef::of(value)?;
        let name = reference
            .name
            .clone()
            .ok_or(KubeError::Malformed("metadata.name"))?;
        let (api, _) = self.api(&reference).await?;
        let mut body = value.clone();
        let status = body.as_object_mut().and_then(|m| m.remove("status"));
        let mut patched = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await?;
        if let Some(status) = status {
            let status_patch = serde_json::json!({ "status": status });
            patched = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status_patch))
                .await?;
        }
        serde_json::to_value(patched).map_err(|e| KubeError::Client(e.to_string()))
    }

    /// Creates, or merge-patches when the object exists. Returns whether it was created.
    pub async fn apply(&self, value: &Value) -> Result<bool, KubeError> {
        match self.create(value).await {
            Ok(_) => Ok(true),
            Err(err) if err.code() == Some(409) => self.patch(value).await.map(|_| false),
            Err(err) => Err(err),
        }
    }

    /// The object, or `None` when it does not exist.
    pub async fn get(&self, reference: &ObjectRef) -> Result<Option<Value>, KubeError> {
        let name = reference
            .name
            .clone()
            .ok_or(KubeError::Malformed("metadata.name"))?;
        let (api, _) = self.api(reference).await?;
        match api.get_opt(&name).await? {
            Some(object) => Ok(Some(
                serde_json::to_value(object).map_err(|e| KubeError::Client(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Objects of the kind (in the namespace, with the labels).
    pub async fn list(&self, reference: &ObjectRef, labels: &str) -> Result<Vec<Value>, KubeError> {
        let (api, _) = self.api(reference).await?;
        let mut params = ListParams::default();
        if !labels.is_empty() {
            params = params.labels(labels);
        }
        let list = api.list(&params).await?;
        list.items
            .into_iter()
            .map(|mut item| {
                // Items of a list have no apiVersion/kind of their own on the wire.
                item.types.get_or_insert_with(|| kube::core::TypeMeta {
                    api_version: reference.api_version.clone(),
                    kind: reference.kind.clone(),
                });
                serde_json::to_value(item).map_err(|e| KubeError::Client(e.to_string()))
            })
            .collect()
    }

    /// Deletes an object; `Ok(false)` when it did not exist.
    pub async fn delete(&self, reference: &ObjectRef) -> Result<bool, KubeError> {
        let name = reference
            .name
            .clone()
            .ok_or(KubeError::Malformed("metadata.name"))?;
        let (api, _) = self.api(reference).await?;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

/// Creates or updates an object (used to install CRDs).
pub async fn create_or_update(kube: &Kube, value: &Value) -> Result<bool, KubeError> {
    kube.apply(value).await
}
