//! The internal API's listener: mutual TLS against the internal CA (reloaded live), one HTTP
//! connection per caller, and its part in a drain.
//!
//! A drain closes no keep-alive connection under a caller's next request. From the moment the
//! replica starts leaving (`--shutdown-delay`, or the drain itself) every HTTP/1 answer says
//! `Connection: close`, so a caller in use moves to another replica after its answer, between
//! requests, where no race can lose one. [`CLOSE_GRACE`] after the drain has begun, the
//! connections still open are closed (HTTP/2: GOAWAY), each once its requests in flight are
//! answered. Closing an idle HTTP/1 connection is the one step a client can race (its request
//! crosses the FIN); the grace leaves that race only to connections idle all along.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::Router;
use buildplane_pki::{ClientCaBundle, ReloadableCert};
use buildplane_runtime::Tasks;
use http::{HeaderValue, header::CONNECTION};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::{Shared, proxy};

/// Pause after a failed accept (EMFILE, ENFILE, ECONNABORTED), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// A client of the internal API that has not finished its TLS handshake by then is dropped.
const INTERNAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the drain has begun the internal API's connections are closed (each once
/// its requests in flight are answered). Until then every HTTP/1 answer says
/// `Connection: close`: a caller sending at 1 request per second or more leaves on an answer.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The internal API's TLS for new handshakes and the client CA it verifies, swapped together
/// when `--internal-client-ca` changes.
pub(crate) struct InternalTls {
    config: Arc<rustls::ServerConfig>,
    client_ca: Arc<ClientCaBundle>,
}

impl InternalTls {
    /// Without session resumption: a session of a client the previous CA admitted must not
    /// resume after the CA changed.
    pub(crate) fn new(
        server_cert: Arc<ReloadableCert>,
        client_ca_pem: &[u8],
    ) -> anyhow::Result<Self> {
        Ok(Self {
            config: crate::without_resumption(buildplane_pki::mtls_server_config(
                server_cert,
                client_ca_pem,
            )?),
            client_ca: Arc::new(ClientCaBundle::parse(client_ca_pem)?),
        })
    }
}

/// Whether a live internal connection's client chain still verifies against `bundle`.
fn still_trusted(
    bundle: &ClientCaBundle,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<(), buildplane_pki::VerifyError> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(buildplane_pki::VerifyError::Invalid(
            "no client certificate".into(),
        ));
    };
    bundle.verify_client(leaf, intermediates, rustls_pki_types::UnixTime::now())
}

/// Polls the internal API's client CA file and swaps a new TLS configuration in when it
/// changes; an unusable file keeps the previous CA in force (and is retried while it changes).
pub(crate) fn watch_client_ca(
    tasks: &mut Tasks,
    path: PathBuf,
    mut current: Vec<u8>,
    server_cert: Arc<ReloadableCert>,
    tls: watch::Sender<InternalTls>,
    every: Duration,
) {
    tasks.spawn("internal client CA reload", crate::looping(async move {
        let mut refused: Option<Vec<u8>> = None;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Ok(fresh) = std::fs::read(&path) else {
                continue;
            };
            if fresh == current || refused.as_ref() == Some(&fresh) {
                continue;
            }
            match InternalTls::new(server_cert.clone(), &fresh) {
                Ok(next) => {
                    tls.send_replace(next);
                    info!(ca = %path.display(), "reloaded the internal API's client CA");
                    current = fresh;
                    refused = None;
                }
                // Often a half-written file: the next change is tried again.
                Err(err) => {
                    warn!(ca = %path.display(), %err, "internal API client CA not loadable; keeping the previous one");
                    refused = Some(fresh);
                }
            }
        }
    }));
}

/// What one connection needs of the gateway.
#[derive(Clone)]
struct ConnectionContext {
    router: Router,
    peers: Option<Arc<crate::peers::Peers>>,
    /// Set when the replica starts leaving: HTTP/1 answers say `Connection: close`.
    leaving: Arc<AtomicBool>,
    drain_started: CancellationToken,
    shutdown: CancellationToken,
}

/// Accepts internal API connections until the gateway stops; each is tracked in
/// `shared.internal_connections`, which the shutdown waits for.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: watch::Sender<InternalTls>,
) {
    let context = ConnectionContext {
        router: crate::internal::router(shared.clone()),
        peers: shared.peers.clone(),
        leaving: shared.draining.clone(),
        drain_started: shared.drain_started.clone(),
        shutdown: shared.shutdown.clone(),
    };
    let connections: TaskTracker = shared.internal_connections.clone();
    drop(shared);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors fails every accept until one is freed: back off
            // instead of spinning, as the agent listener does.
            Err(err) => {
                debug!(%err, "internal API accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Proxied responses are written in pieces; Nagle would hold the last one back
        // (40 ms p99 tails measured in `cargo xtask bench` without this).
        let _ = tcp.set_nodelay(true);
        // The client CA in force now: a reload since the last accept counts.
        let client_ca = tls.subscribe();
        let context = context.clone();
        let shutdown = context.shutdown.clone();
        connections.spawn(async move {
            tokio::select! {
                () = connection(tcp, peer, client_ca, context) => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// Serves one caller's connection: TLS, then HTTP/1 or HTTP/2 until either end closes, the
/// reloaded client CA no longer admits the caller, or the drain closes it.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    mut client_ca: watch::Receiver<InternalTls>,
    context: ConnectionContext,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(client_ca.borrow_and_update().config.clone());
    let tls = match tokio::time::timeout(INTERNAL_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(%peer, %err, "internal API handshake refused");
            return;
        }
        Err(_) => {
            debug!(%peer, "internal API handshake timed out");
            return;
        }
    };
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let caller = proxy::InternalCaller::of(context.peers.as_deref(), &chain);
    debug!(%peer, alpn = ?tls.get_ref().1.alpn_protocol().map(String::from_utf8_lossy), ?caller, "internal API connection");
    let router = context.router;
    let leaving = context.leaving;
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            let http1 = request.version() < http::Version::HTTP_2;
            request.extensions_mut().insert(caller);
            let answer = router.clone().oneshot(request);
            let leaving = leaving.clone();
            async move {
                let Ok(mut response) = answer.await;
                if http1 && leaving.load(Ordering::SeqCst) {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let close_at = async {
        context.drain_started.cancelled().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::pin!(close_at);
    // A live connection (the controller's event stream) outlives a CA change: when the new
    // CA no longer admits its client, it is closed.
    let mut closing = false;
    loop {
        tokio::select! {
            ended = &mut conn => {
                debug!(%peer, ?ended, "internal API connection ended");
                return;
            }
            () = &mut close_at, if !closing => {
                debug!(%peer, "internal API connection closing for the drain");
                // Answer what is in flight, then close: a keep-alive connection is not cut
                // under a request.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            changed = client_ca.changed() => {
                if changed.is_err() {
                    return;
                }
                let bundle = client_ca.borrow_and_update().client_ca.clone();
                if let Err(err) = still_trusted(&bundle, &chain) {
                    info!(%peer, %err, "internal API client no longer trusted by the reloaded CA; closing");
                    return;
                }
            }
        }
    }
}
