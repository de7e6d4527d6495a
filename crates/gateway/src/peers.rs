//! The sibling replicas of this gateway, found in Kubernetes itself: the EndpointSlices of the
//! gateway's Service (`--peer-service <namespace>/<name>`), watched with kube-rs. Each ready
//! endpoint is a replica (its `targetRef` name, else its hostname, is the replica id; this
//! replica's own id is left out), reached at its address and the slice's port named
//! `--peer-port-name` (`internal`) over the internal API's mTLS, with a client certificate of
//! the internal CA (`--peer-client-cert`/`--peer-client-key`, reloaded when the files change)
//! and the CA that signed the replicas' internal certificate (`--peer-ca`). The proxy forwards a
//! request here when no connection of this replica can take it (`proxy::forward`); nothing is
//! stored anywhere but in the Service's own EndpointSlices.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use parking_lot::{Mutex, RwLock};
use tracing::{info, warn};

/// Where the sibling replicas are listed and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeersConfig {
    /// Namespace of the gateway's Service.
    pub namespace: String,
    /// Name of the gateway's Service (its EndpointSlices carry
    /// `kubernetes.io/service-name=<name>`).
    pub service: String,
    /// The name of the internal API's port in the EndpointSlices.
    pub port_name: String,
    /// The name the replicas' internal certificate is checked against (default
    /// `<service>.<namespace>.svc`): a request goes to the endpoint's address, TLS verifies
    /// this name.
    pub server_name: String,
    /// Client certificate and key (PEM files) signed by the internal API's client CA.
    pub client_cert: (PathBuf, PathBuf),
    /// The CA bundle (PEM file) that signed the replicas' internal certificate.
    pub server_ca: PathBuf,
}

impl PeersConfig {
    /// Parses `--peer-service <namespace>/<name>`; the server name defaults to
    /// `<name>.<namespace>.svc`.
    pub fn new(
        service: &str,
        client_cert: (PathBuf, PathBuf),
        server_ca: PathBuf,
    ) -> anyhow::Result<PeersConfig> {
        let Some((namespace, name)) = service
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        else {
            anyhow::bail!("--peer-service {service:?} is not <namespace>/<name>");
        };
        Ok(PeersConfig {
            namespace: namespace.to_owned(),
            service: name.to_owned(),
            port_name: "internal".into(),
            server_name: format!("{name}.{namespace}.svc"),
            client_cert,
            server_ca,
        })
    }
}

/// One sibling replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its replica id (the pod name).
    pub id: String,
    /// Its internal API.
    pub addr: SocketAddr,
}

/// The sibling replicas as the EndpointSlices list them, and one mTLS client per address.
pub struct Peers {
    config: PeersConfig,
    own_id: String,
    list: RwLock<Vec<Peer>>,
    next: AtomicUsize,
    tls: rustls::ClientConfig,
    clients: Mutex<HashMap<IpAddr, reqwest::Client>>,
    /// This replica's client certificate for its siblings: every replica of the Deployment
    /// mounts the same one, so a caller presenting its subject is a sibling.
    client_cert: Arc<buildplane_pki::ReloadableCert>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("config", &self.config)
            .field("own_id", &self.own_id)
            .field("list", &*self.list.read())
            .finish_non_exhaustive()
    }
}

/// A sibling could not be asked (nothing was sent to it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Peers {
    /// The peers of replica `own_id`, with the client certificate `client_cert` (reloaded by the
    /// caller) and no sibling known yet.
    pub fn new(
        config: PeersConfig,
        own_id: String,
        client_cert: Arc<buildplane_pki::ReloadableCert>,
    ) -> anyhow::Result<Peers> {
        let ca = std::fs::read(&config.server_ca)
            .with_context(|| format!("reading {}", config.server_ca.display()))?;
        let tls = (*buildplane_pki::client_config(&ca, Some(client_cert.clone()))?).clone();
        Ok(Peers {
            config,
            own_id,
            list: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            tls,
            clients: Mutex::new(HashMap::new()),
            client_cert,
        })
    }

    /// Whether an internal-API caller that presented `leaf` (already verified against the
    /// internal client CA) is a sibling replica: its certificate names the subject of this
    /// replica's own peer client certificate. The subject, not the bytes, so that replicas
    /// still agree while a renewed certificate reaches their pods one by one.
    pub fn is_sibling(&self, leaf: &rustls::pki_types::CertificateDer<'_>) -> bool {
        buildplane_pki::same_subject(&self.client_cert.leaf(), leaf)
    }

    /// Watches the Service's EndpointSlices and keeps the sibling list current.
    pub fn watch(self: &Arc<Self>, client: Client, tasks: &mut buildplane_runtime::Tasks) {
        let api: Api<EndpointSlice> = Api::namespaced(client, &self.config.namespace);
        let selector = format!("kubernetes.io/service-name={}", self.config.service);
        let (store, writer) = reflector::store();
        let peers = self.clone();
        tasks.spawn("watch of the gateway's EndpointSlices", async move {
            let stream = watcher(api, watcher::Config::default().labels(&selector))
                .default_backoff()
                .reflect(writer);
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Ok(_) => {
                        let slices: Vec<Arc<EndpointSlice>> = store.state();
                        // An FQDN endpoint is resolved with the system resolver, which blocks:
                        // off the runtime's workers.
                        let (port_name, own_id) =
                            (peers.config.port_name.clone(), peers.own_id.clone());
                        let found = tokio::task::spawn_blocking(move || {
                            siblings(slices.iter().map(|s| s.as_ref()), &port_name, &own_id)
                        })
                        .await;
                        match found {
                            Ok(found) => peers.set(found),
                            Err(err) => warn!(%err, "resolving the sibling replicas failed"),
                        }
                    }
                    Err(err) => {
                        warn!(%err, "watch of the gateway's EndpointSlices failed; retrying")
                    }
                }
            }
        });
    }

    /// Replaces the sibling list.
    pub fn set(&self, peers: Vec<Peer>) {
        let mut list = self.list.write();
        if *list != peers {
            let ids: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
            info!(?ids, "sibling replicas");
            *list = peers;
        }
    }

    /// This replica's id.
    pub fn own_id(&self) -> &str {
        &self.own_id
    }

    /// The siblings, starting at the next in rotation (requests spread over them).
    pub fn rotation(&self) -> Vec<Peer> {
        let list = self.list.read();
        if list.is_empty() {
            return Vec::new();
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed) % list.len();
        list[first..]
            .iter()
            .chain(&list[..first])
            .cloned()
            .collect()
    }

    /// How many siblings are known.
    pub fn len(&self) -> usize {
        self.list.read().len()
    }

    /// Whether no sibling is known.
    pub fn is_empty(&self) -> bool {
        self.list.read().is_empty()
    }

    /// The URL of `path_and_query` on `peer` (its address is resolved by [`Peers::client`]).
    pub fn url(&self, peer: &Peer, path_and_query: &str) -> String {
        format!(
            "https://{}:{}{path_and_query}",
            self.config.server_name,
            peer.addr.port()
        )
    }

    /// The client for `peer`: the server name resolves to its address, TLS checks the name.
    pub fn client(&self, peer: &Peer) -> Result<reqwest::Client, reqwest::Error> {
        let ip = peer.addr.ip();
        let mut clients = self.clients.lock();
        if let Some(client) = clients.get(&ip) {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .resolve(&self.config.server_name, SocketAddr::new(ip, 0))
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        // Addresses come and go with pods; a few stale clients cost nothing until then.
        if clients.len() > 64 {
            clients.clear();
        }
        clients.insert(ip, client.clone());
        Ok(client)
    }
}

/// An endpoint's address as an IP: itself for `IPv4`/`IPv6` slices, the name resolved (IPv4
/// first) for `FQDN` slices (a real API server refuses loopback IPs in an IP slice, so a
/// replica on loopback is listed as `<name>.localhost`).
fn address_ip(address: &str) -> Option<IpAddr> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Some(ip);
    }
    // RFC 6761: `localhost` and names under it are loopback, whatever the resolver says (glibc
    // knows only `localhost` itself; the API server wants at least two labels).
    let name = address.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    use std::net::ToSocketAddrs;
    let resolved: Vec<IpAddr> = (address, 0)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .collect();
    resolved
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| resolved.first())
        .copied()
}

/// The ready endpoints of `slices` on the port named `port_name`, without `own_id`, by id.
pub fn siblings<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    port_name: &str,
    own_id: &str,
) -> Vec<Peer> {
    let mut found = BTreeMap::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .or_else(|| (ports.len() == 1).then(|| &ports[0]))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Unset means ready (the API's own rule); a terminating replica is not.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let Some(ip) = endpoint.addresses.first().and_then(|a| address_ip(a)) else {
                continue;
            };
            let addr = SocketAddr::new(ip, port);
            let id = endpoint
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .or_else(|| endpoint.hostname.clone())
                .unwrap_or_else(|| addr.to_string());
            if !ready || id == own_id {
                continue;
            }
            found.insert(id.clone(), Peer { id, addr });
        }
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(port: (&str, i32), endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "gw"}},
            "addressType": "IPv4",
            "ports": [{"name": "agent", "port": 8443}, {"name": port.0, "port": port.1}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    /// An FQDN slice's address is resolved (the harness lists loopback replicas as
    /// `localhost`, which a real API server accepts where it refuses 127.0.0.1 in an IPv4
    /// slice); an unresolvable one is skipped.
    #[test]
    fn fqdn_addresses_are_resolved() {
        assert_eq!(address_ip("10.0.0.7"), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(address_ip("localhost"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            address_ip("gateway-1.localhost"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(address_ip("no-such-host.invalid"), None);
    }

    /// Ready endpoints on the named port, this replica left out, named by their pod; a
    /// terminating or not-ready one is no sibling; slices of one Service merge.
    #[test]
    fn siblings_are_the_ready_endpoints_but_this_replica() {
        let a = slice(
            ("internal", 8444),
            serde_json::json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "gw-0"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "gw-1"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "gw-2"}},
            ]),
        );
        let b = slice(
            ("internal", 9444),
            serde_json::json!([{"addresses": ["127.0.0.1"], "hostname": "gw-3"}]),
        );
        let peers = siblings([&a, &b].into_iter(), "internal", "gw-1");
        assert_eq!(
            peers,
            [
                Peer {
                    id: "gw-0".into(),
                    addr: "10.0.0.1:8444".parse().unwrap()
                },
                Peer {
                    id: "gw-3".into(),
                    addr: "127.0.0.1:9444".parse().unwrap()
                },
            ]
        );
        assert!(siblings([&a].into_iter(), "nope", "x").is_empty());
    }

    #[test]
    fn the_service_flag_is_namespace_and_name() {
        let config = PeersConfig::new("ns/gw", ("c".into(), "k".into()), "ca".into()).unwrap();
        assert_eq!(config.server_name, "gw.ns.svc");
        for bad in ["gw", "/gw", "ns/", "a/b/c"] {
            assert!(
                PeersConfig::new(bad, ("c".into(), "k".into()), "ca".into()).is_err(),
                "{bad}"
            );
        }
    }
}
