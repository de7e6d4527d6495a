//! The agent's identity, owned by the agent: a CA (Secret `cluster-agent-ca`, key readable only by
//! the agent) and a short-lived client leaf (Secret `cluster-agent-tls` with `ca.crt`, `tls.crt`,
//! `tls.key`, the seed's names). The leaf is renewed under the same CA, so the `clientCA`
//! registered in the BuildPlane stays valid (OpenChoreo's pinned self-signed leaf does not).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use buildplane_api::names;
use buildplane_pki::{Ca, Leaf};
use futures::StreamExt as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The identity in use.
pub struct Identity {
    /// The CA bundle published as `ca.crt` (during a rotation: old and new CA).
    pub ca_bundle_pem: String,
    /// The leaf.
    pub leaf: Leaf,
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn secret(namespace: &str, name: &str, entries: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "cluster-agent".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

async fn upsert(api: &Api<Secret>, desired: Secret) -> anyhow::Result<()> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        Some(mut existing) => {
            existing.data = desired.data;
            api.replace(&name, &PostParams::default(), &existing)
                .await
                .with_context(|| format!("updating Secret {name}"))?;
        }
        None => {
            api.create(&PostParams::default(), &desired)
                .await
                .with_context(|| format!("creating Secret {name}"))?;
        }
    }
    Ok(())
}

/// Loads the identity, creating the CA and leaf when missing and renewing a leaf that expires
/// within `renew_before`.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    plane_id: &str,
    leaf_validity: Duration,
    renew_before: Duration,
) -> anyhow::Result<Identity> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(namespace).await?.is_none() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => info!(namespace, "created the agent namespace"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err).context("creating the agent namespace"),
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca_secret = secrets.get_opt(names::AGENT_CA_KEY_SECRET).await?;
    let ca = match ca_secret
        .as_ref()
        .and_then(|s| Some((data(s, names::CA_CERT_KEY)?, data(s, names::CA_KEY_KEY)?)))
    {
        Some((cert, key)) => Ca::from_pem(&cert, &key).context("loading the agent CA")?,
        None => {
            let ca = Ca::generate(
                &format!("cluster-agent-ca-{plane_id}"),
                Duration::from_secs(10 * 365 * 86_400),
            )?;
            upsert(
                &secrets,
                secret(
                    namespace,
                    names::AGENT_CA_KEY_SECRET,
                    &[
                        (names::CA_CERT_KEY, ca.cert_pem()),
                        (names::CA_KEY_KEY, ca.key_pem()),
                    ],
                ),
            )
            .await?;
            info!(namespace, "generated the agent CA");
            ca
        }
    };
    let tls = secrets.get_opt(names::AGENT_TLS_SECRET).await?;
    let existing = tls.as_ref().and_then(|s| {
        Some((
            data(s, names::CA_CERT_KEY)?,
            Leaf {
                cert_pem: data(s, names::TLS_CERT_KEY)?,
                key_pem: data(s, names::TLS_KEY_KEY)?,
            },
        ))
    });
    let now = unix_now();
    if let Some((bundle, leaf)) = existing {
        let fresh = leaf
            .not_after()
            .map(|t| t - now > renew_before.as_secs() as i64)
            .unwrap_or(false);
        let signed_by_current = buildplane_pki::ClientCaBundle::from_pem(ca.cert_pem().as_bytes())
            .ok()
            .zip(buildplane_pki::parse_cert_bundle(leaf.cert_pem.as_bytes()).ok())
            .is_some_and(|(b, chain)| {
                b.verify_client(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
                    .is_ok()
            });
        if fresh && signed_by_current {
            return Ok(Identity {
                ca_bundle_pem: bundle,
                leaf,
            });
        }
    }
    renew(client, namespace, plane_id, &ca, leaf_validity).await
}

/// Issues a new leaf under the current CA and stores it.
pub async fn renew(
    client: &Client,
    namespace: &str,
    plane_id: &str,
    ca: &Ca,
    leaf_validity: Duration,
) -> anyhow::Result<Identity> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let leaf = ca.issue_client(plane_id, leaf_validity)?;
    let bundle = match secrets
        .get_opt(names::AGENT_TLS_SECRET)
        .await?
        .and_then(|s| data(&s, names::CA_CERT_KEY))
    {
        Some(bundle) if bundle.contains(ca.cert_pem().trim()) => bundle,
        _ => ca.cert_pem().to_owned(),
    };
    upsert(
        &secrets,
        secret(
            namespace,
            names::AGENT_TLS_SECRET,
            &[
                (names::CA_CERT_KEY, &bundle),
                (names::TLS_CERT_KEY, &leaf.cert_pem),
                (names::TLS_KEY_KEY, &leaf.key_pem),
            ],
        ),
    )
    .await?;
    info!(namespace, "issued a client certificate");
    Ok(Identity {
        ca_bundle_pem: bundle,
        leaf,
    })
}

/// Loads the CA from its Secret.
pub async fn load_ca(client: &Client, namespace: &str) -> anyhow::Result<Ca> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = secrets
        .get(names::AGENT_CA_KEY_SECRET)
        .await
        .context("reading the agent CA Secret")?;
    let cert = data(&s, names::CA_CERT_KEY).context("the CA Secret has no ca.crt")?;
    let key = data(&s, names::CA_KEY_KEY).context("the CA Secret has no ca.key")?;
    Ok(Ca::from_pem(&cert, &key)?)
}

/// CA rotation: `start` generates a new CA, publishes old+new in `ca.crt` and switches the leaf to
/// the new CA; `finish` drops the old CA from `ca.crt`.
pub async fn rotate_ca(
    client: &Client,
    namespace: &str,
    plane_id: &str,
    finish: bool,
    leaf_validity: Duration,
) -> anyhow::Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = load_ca(client, namespace).await?;
    if finish {
        let tls = secrets.get(names::AGENT_TLS_SECRET).await?;
        let leaf = Leaf {
            cert_pem: data(&tls, names::TLS_CERT_KEY).unwrap_or_default(),
            key_pem: data(&tls, names::TLS_KEY_KEY).unwrap_or_default(),
        };
        upsert(
            &secrets,
            secret(
                namespace,
                names::AGENT_TLS_SECRET,
                &[
                    (names::CA_CERT_KEY, ca.cert_pem()),
                    (names::TLS_CERT_KEY, &leaf.cert_pem),
                    (names::TLS_KEY_KEY, &leaf.key_pem),
                ],
            ),
        )
        .await?;
        return Ok(ca.cert_pem().to_owned());
    }
    let new_ca = Ca::generate(
        &format!("cluster-agent-ca-{plane_id}"),
        Duration::from_secs(10 * 365 * 86_400),
    )?;
    let bundle = format!("{}{}", ca.cert_pem(), new_ca.cert_pem());
    let leaf = new_ca.issue_client(plane_id, leaf_validity)?;
    upsert(
        &secrets,
        secret(
            namespace,
            names::AGENT_CA_KEY_SECRET,
            &[
                (names::CA_CERT_KEY, new_ca.cert_pem()),
                (names::CA_KEY_KEY, new_ca.key_pem()),
            ],
        ),
    )
    .await?;
    upsert(
        &secrets,
        secret(
            namespace,
            names::AGENT_TLS_SECRET,
            &[
                (names::CA_CERT_KEY, &bundle),
                (names::TLS_CERT_KEY, &leaf.cert_pem),
                (names::TLS_KEY_KEY, &leaf.key_pem),
            ],
        ),
    )
    .await?;
    Ok(bundle)
}

/// After a change of either Secret, further changes this close are taken together (`rotate-ca`
/// writes both).
const SETTLE: Duration = Duration::from_millis(100);

/// After a failed check, the next one.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Follows the identity: watches the two Secrets, and after every change (another process
/// writing them: `cluster-agent renew`, `rotate-ca`) and when the leaf is due for renewal
/// (`renew_before` ahead of its expiry, re-armed after each change) runs [`ensure`], which
/// renews under the same CA when due, and reports the identity to `on_identity`. Reads nothing
/// while nothing changes. Returns only if the watch ends (it retries errors with backoff).
pub async fn follow(
    client: &Client,
    namespace: &str,
    plane_id: &str,
    leaf_validity: Duration,
    renew_before: Duration,
    mut on_identity: impl FnMut(Identity),
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let watch = |name: &str| {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        watcher(secrets.clone(), config).default_backoff().boxed()
    };
    let mut changes = futures::stream::select(
        watch(names::AGENT_CA_KEY_SECRET),
        watch(names::AGENT_TLS_SECRET),
    );
    // The first check comes with the watches' initial lists (`InitDone`).
    let mut next_check: Option<Instant> = None;
    loop {
        let check = async {
            match next_check {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = changes.next() => match event {
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)) => {
                    let settled = Instant::now() + SETTLE;
                    next_check = Some(next_check.map_or(settled, |at| at.min(settled)));
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Err(err)) => warn!(%err, "identity Secret watch failed; retrying"),
                None => anyhow::bail!("the identity Secret watch ended"),
            },
            () = check => {
                next_check = Some(match ensure(client, namespace, plane_id, leaf_validity, renew_before).await {
                    Ok(identity) => {
                        let due = renewal_due_in(&identity.leaf, renew_before, unix_now());
                        debug!(due_in_s = due.as_secs(), "identity checked; renewal scheduled");
                        on_identity(identity);
                        // At least a second apart: a leaf that cannot be made fresh (renew_before
                        // longer than the validity) must not spin.
                        Instant::now() + due.max(Duration::from_secs(1))
                    }
                    Err(err) => {
                        warn!(%err, "identity check failed");
                        Instant::now() + RETRY_AFTER_ERROR
                    }
                });
            }
        }
    }
}

/// How long from `now` (Unix seconds) until `leaf` is due for renewal: `renew_before` ahead
/// of its expiry (zero when due already, or when its expiry cannot be read).
pub fn renewal_due_in(leaf: &Leaf, renew_before: Duration, now: i64) -> Duration {
    let Ok(not_after) = leaf.not_after() else {
        return Duration::ZERO;
    };
    let renew_before = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
    let due = not_after.saturating_sub(renew_before);
    Duration::from_secs(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renewal is due `renew_before` ahead of the leaf's expiry, counted from now; never
    /// negative.
    #[test]
    fn renewal_is_due_renew_before_ahead_of_expiry() {
        let ca = Ca::generate("agent-ca", Duration::from_secs(86_400)).unwrap();
        let leaf = ca.issue_client("p", Duration::from_secs(86_400)).unwrap();
        let not_after = leaf.not_after().unwrap();
        let hour = Duration::from_secs(3600);
        let check = |now: i64, renew_before: Duration, expected: Duration| {
            assert_eq!(
                renewal_due_in(&leaf, renew_before, now),
                expected,
                "{now} {renew_before:?}"
            );
        };
        check(not_after - 24 * 3600, hour * 8, hour * 16);
        check(not_after - 8 * 3600, hour * 8, Duration::ZERO);
        check(not_after, hour * 8, Duration::ZERO);
        check(not_after - 10, Duration::ZERO, Duration::from_secs(10));
        check(not_after - 10, Duration::MAX, Duration::ZERO);
    }
}
