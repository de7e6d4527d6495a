//! The data of the Secrets that some CR's `clientCA.secretRef` names, and of no other Secret.
//!
//! The gateway cannot know in advance which Secrets CRs will name, so it watches them all, but
//! it keeps only the referenced ones: another Secret's event is decoded and dropped, and no other
//! Secret's data (service-account tokens, any key material that shares the control cluster)
//! stays in the gateway's memory. When a CR names a Secret that no CR named before, its data is
//! fetched once (a `GET`), since the watch has already gone past it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt, runtime::WatchStreamExt, runtime::watcher};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{PlaneIndex, SecretRef, TrustChange};

/// A Secret's `data`.
type SecretData = BTreeMap<String, Vec<u8>>;

/// The referenced Secrets' data, and whether the first list has been seen.
#[derive(Clone)]
pub struct SecretCache {
    data: Arc<parking_lot::RwLock<HashMap<SecretRef, SecretData>>>,
    ready: watch::Receiver<bool>,
}

/// Marks a [`SecretCache`] ready (its first list is in).
pub(crate) struct SecretsReady(watch::Sender<bool>);

fn data_of(secret: &Secret) -> SecretData {
    secret
        .data
        .iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.0.clone()))
        .collect()
}

fn key_of(secret: &Secret) -> Option<SecretRef> {
    Some((secret.namespace()?, secret.name_any()))
}

impl SecretCache {
    /// An empty cache, not ready until its [`SecretsReady`] says so.
    pub(crate) fn new() -> (SecretCache, SecretsReady) {
        let (ready_tx, ready) = watch::channel(false);
        let cache = SecretCache {
            data: Arc::default(),
            ready,
        };
        (cache, SecretsReady(ready_tx))
    }

    /// A ready cache holding these Secrets (tests, and [`super::Trust::from_stores`]).
    pub fn holding(secrets: impl IntoIterator<Item = Secret>) -> SecretCache {
        let (cache, ready) = SecretCache::new();
        for secret in secrets {
            if let Some(key) = key_of(&secret) {
                cache.data.write().insert(key, data_of(&secret));
            }
        }
        ready.0.send_replace(true);
        cache
    }

    /// Waits until the first list of Secrets is in.
    pub(crate) async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// The value of `data_key` in the Secret `namespace/name`, or why there is none.
    pub(crate) fn value(&self, secret: &SecretRef, data_key: &str) -> Result<Vec<u8>, String> {
        let (namespace, name) = secret;
        let data = self.data.read();
        let values = data
            .get(secret)
            .ok_or_else(|| format!("Secret {namespace}/{name} not found"))?;
        values
            .get(data_key)
            .cloned()
            .ok_or_else(|| format!("Secret {namespace}/{name} has no key {data_key:?}"))
    }

    /// How many Secrets it holds.
    pub(crate) fn len(&self) -> usize {
        self.data.read().len()
    }

    fn contains(&self, secret: &SecretRef) -> bool {
        self.data.read().contains_key(secret)
    }

    /// Drops a Secret no CR names any more.
    pub(crate) fn forget(&self, secret: &SecretRef) {
        self.data.write().remove(secret);
    }
}

/// Where the planes index reports Secrets that CRs start or stop naming.
#[derive(Clone)]
pub(crate) struct References {
    pub(crate) cache: SecretCache,
    pub(crate) fetch: mpsc::UnboundedSender<SecretRef>,
}

impl References {
    /// A CR's Secret changed from `before` to `after`; `still_named` says whether any CR names
    /// a Secret now.
    pub(crate) fn moved(
        &self,
        before: Option<SecretRef>,
        after: Option<SecretRef>,
        still_named: impl Fn(&SecretRef) -> bool,
    ) {
        if before == after {
            return;
        }
        if let Some(before) = before
            && !still_named(&before)
        {
            self.cache.forget(&before);
        }
        if let Some(after) = after
            && !self.cache.contains(&after)
        {
            let _ = self.fetch.send(after);
        }
    }
}

fn readers(planes: &PlaneIndex, secret: &SecretRef) -> Option<TrustChange> {
    let affected: BTreeSet<String> = planes.read().planes_reading(secret);
    (!affected.is_empty()).then_some(TrustChange::Planes(affected))
}

/// Watches every Secret and keeps the referenced ones: a change of one re-verifies the planes
/// of the CRs that read it, and any other Secret's change costs one decode.
pub(crate) fn spawn_watch(
    api: Api<Secret>,
    cache: SecretCache,
    ready: SecretsReady,
    planes: PlaneIndex,
    changed: mpsc::UnboundedSender<TrustChange>,
    tasks: &mut buildplane_runtime::Tasks,
) {
    tasks.spawn("watch of secrets".to_string(), async move {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let named = |key: &SecretRef| planes.read().is_named(key);
        // The Secrets of a relist in progress; swapped in at its end (it may have missed
        // deletions while the watch was down).
        let mut relist: Option<HashMap<SecretRef, SecretData>> = None;
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Init) => {
                    relist = Some(HashMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(secret)) => {
                    if let Some(key) = key_of(&secret).filter(|key| named(key)) {
                        relist.get_or_insert_default().insert(key, data_of(&secret));
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = relist.take().unwrap_or_default();
                    // A Secret fetched for a new reference during the relist stays.
                    let mut data = cache.data.write();
                    data.retain(|key, _| named(key) && !fresh.contains_key(key));
                    data.extend(fresh);
                    drop(data);
                    ready.0.send_replace(true);
                    Some(TrustChange::All)
                }
                Ok(watcher::Event::Apply(secret)) => key_of(&secret).and_then(|key| {
                    if named(&key) {
                        cache.data.write().insert(key.clone(), data_of(&secret));
                        readers(&planes, &key)
                    } else {
                        None
                    }
                }),
                Ok(watcher::Event::Delete(secret)) => key_of(&secret).and_then(|key| {
                    cache.data.write().remove(&key)?;
                    readers(&planes, &key)
                }),
                Err(err) => {
                    warn!(%err, "watch of secrets failed; retrying");
                    None
                }
            };
            if let Some(change) = change {
                let _ = changed.send(change);
            }
        }
    });
}

/// Fetches the Secrets that CRs start naming and the watch has already gone past.
pub(crate) fn spawn_fetcher(
    client: Client,
    cache: SecretCache,
    planes: PlaneIndex,
    mut fetch: mpsc::UnboundedReceiver<SecretRef>,
    changed: mpsc::UnboundedSender<TrustChange>,
    tasks: &mut buildplane_runtime::Tasks,
) {
    tasks.spawn("fetch of named secrets".to_string(), async move {
        while let Some(key) = fetch.recv().await {
            let (namespace, name) = &key;
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            for attempt in 1..=FETCH_ATTEMPTS {
                if cache.contains(&key) || !planes.read().is_named(&key) {
                    break;
                }
                match api.get_opt(name).await {
                    // The watch's copy, when it came in the meantime, is as new or newer.
                    Ok(Some(secret)) => {
                        if planes.read().is_named(&key) && !cache.contains(&key) {
                            cache.data.write().insert(key.clone(), data_of(&secret));
                            if let Some(change) = readers(&planes, &key) {
                                let _ = changed.send(change);
                            }
                        }
                        break;
                    }
                    Ok(None) => {
                        debug!(%namespace, %name, "named Secret not there (yet); its creation brings it");
                        break;
                    }
                    Err(err) => {
                        warn!(%namespace, %name, %err, attempt, "fetching a named Secret failed");
                        tokio::time::sleep(FETCH_RETRY).await;
                    }
                }
            }
        }
        // The senders live in the CR watches; they end only when those tasks end, which stops
        // the process already.
        std::future::pending::<()>().await;
    });
}

/// Attempts to fetch a newly named Secret (its next change brings it anyway).
const FETCH_ATTEMPTS: u32 = 5;
/// Pause between two attempts.
const FETCH_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
