//! A TCP fault proxy (toxiproxy-like) for the agent → gateway links.
//!
//! Every agent dials the proxy instead of the gateway; the harness sets toxics on the proxy:
//! latency with jitter, bandwidth, blackhole (data silently dropped), reset (RST through
//! `SO_LINGER 0` on every connection), slicer (small chunks with delays) and partition (all data
//! and new connections held until healed, as a network partition that later heals).
//! The upstream address can change at run time, so a restarted gateway may listen elsewhere.
//!
//! A proxy also runs in a process of its own ([`remote`], the `e2e-fault-proxy` binary), so
//! the links of a swarm of thousands of agents are spread over several processes instead of
//! holding two sockets per connection in the harness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::scenario::Direction;

pub mod remote;

/// The faults in force on a link. The default is a healthy link.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Toxics {
    /// Delay added before forwarding each chunk.
    pub latency: Duration,
    /// Random extra delay in `[0, jitter]`.
    pub jitter: Duration,
    /// Bandwidth cap in KiB/s (0: none).
    pub bandwidth_kbps: u64,
    /// Drop data instead of forwarding it.
    pub blackhole: bool,
    /// Reset every connection (and every new one while set).
    pub reset: bool,
    /// Forward in chunks of this many bytes, with `slicer_delay` between them (0: off).
    pub slicer_size: usize,
    /// Delay between slices.
    pub slicer_delay: Duration,
    /// Hold everything until healed.
    pub partition: bool,
    /// Which direction latency, bandwidth, blackhole and slicer apply to.
    pub direction: Direction,
}

impl Toxics {
    fn applies(&self, direction: Direction) -> bool {
        self.direction == Direction::Both || self.direction == direction
    }
}

struct Shared {
    upstream: parking_lot_free::Mutex<SocketAddr>,
    toxics: watch::Sender<Toxics>,
    accepted: AtomicU64,
    active: AtomicUsize,
}

/// `std::sync::Mutex` wrapper that ignores poisoning (the data is a plain address).
mod parking_lot_free {
    /// A mutex whose lock never fails.
    pub(super) struct Mutex<T>(std::sync::Mutex<T>);

    impl<T: Copy> Mutex<T> {
        pub(super) fn new(value: T) -> Self {
            Mutex(std::sync::Mutex::new(value))
        }

        pub(super) fn get(&self) -> T {
            *self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(super) fn set(&self, value: T) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
        }
    }
}

/// A running proxy; dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        FaultProxy::bind(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Listens on `listen` and forwards to `upstream`.
    pub async fn bind(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (toxics, _) = watch::channel(Toxics::default());
        let shared = Arc::new(Shared {
            upstream: parking_lot_free::Mutex::new(upstream),
            toxics,
            accepted: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points new connections at another upstream.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.shared.upstream.set(upstream);
    }

    /// Replaces the toxics in force.
    pub fn set_toxics(&self, toxics: Toxics) {
        self.shared.toxics.send_replace(toxics);
    }

    /// The toxics in force.
    pub fn toxics(&self) -> Toxics {
        self.shared.toxics.borrow().clone()
    }

    /// Removes every toxic; held data flows again.
    pub fn heal(&self) {
        self.set_toxics(Toxics::default());
    }

    /// Connections currently open through the proxy.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Closing the channel ends every connection task (see `wait_reset`).
        self.shared.toxics.send_replace(Toxics {
            reset: true,
            ..Toxics::default()
        });
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.active.fetch_add(1, Ordering::Relaxed);
            let res = connection(client, &shared).await;
            if let Err(err) = res {
                tracing::debug!(%err, "fault proxy connection ended");
            }
            shared.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn reset(stream: &TcpStream) {
    // Linger 0 turns the close into a RST.
    let _ = stream.set_zero_linger();
}

async fn connection(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut toxics = shared.toxics.subscribe();
    if toxics.borrow().reset {
        reset(&client);
        return Ok(());
    }
    // A partition holds new connections too; they proceed when it heals (or reset when asked).
    let _ = toxics.wait_for(|t| !t.partition || t.reset).await;
    if toxics.borrow().reset {
        reset(&client);
        return Ok(());
    }
    let upstream = match TcpStream::connect(shared.upstream.get()).await {
        Ok(upstream) => upstream,
        Err(err) => {
            // The upstream refused: the client sees a reset, like a refused connection.
            reset(&client);
            return Err(err);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let was_reset = {
        let up = pump(
            &mut client_read,
            &mut upstream_write,
            Direction::Upstream,
            shared.toxics.subscribe(),
        );
        let down = pump(
            &mut upstream_read,
            &mut client_write,
            Direction::Downstream,
            shared.toxics.subscribe(),
        );
        let mut reset_rx = shared.toxics.subscribe();
        tokio::select! {
            _ = futures::future::join(up, down) => false,
            _ = reset_rx.wait_for(|t| t.reset) => true,
        }
    };
    if was_reset {
        reset(client_read.as_ref());
        reset(upstream_read.as_ref());
        // Dropping a write half would send a FIN first; `forget` leaves the close to the read
        // half, which now sends a RST.
        client_write.forget();
        upstream_write.forget();
    }
    Ok(())
}

async fn pump(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    direction: Direction,
    mut toxics: watch::Receiver<Toxics>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A partition stops reading too, so TCP back-pressure reaches the sender.
        if toxics.wait_for(|t| !t.partition).await.is_err() {
            return;
        }
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = write.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if toxics.wait_for(|t| !t.partition).await.is_err() {
            return;
        }
        let current = toxics.borrow().clone();
        if !current.applies(direction) {
            if write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            continue;
        }
        if current.blackhole {
            continue;
        }
        let mut delay = current.latency;
        if !current.jitter.is_zero() {
            let jitter_ms = current.jitter.as_millis() as u64;
            delay += Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
        }
        if current.bandwidth_kbps > 0 {
            delay += Duration::from_secs_f64(n as f64 / (current.bandwidth_kbps as f64 * 1024.0));
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let slice = if current.slicer_size > 0 {
            current.slicer_size
        } else {
            n
        };
        for (i, chunk) in buf[..n].chunks(slice).enumerate() {
            if i > 0 && !current.slicer_delay.is_zero() {
                tokio::time::sleep(current.slicer_delay).await;
            }
            if write.write_all(chunk).await.is_err() {
                return;
            }
            if current.slicer_size > 0 && write.flush().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::{Instant, timeout};

    use super::*;

    /// An upstream that echoes everything and records the size of each read.
    async fn echo_server() -> (SocketAddr, Arc<std::sync::Mutex<Vec<usize>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = reads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        recorded.lock().unwrap().push(n);
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, reads)
    }

    async fn roundtrip(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(data).await?;
        let mut out = vec![0u8; data.len()];
        stream.read_exact(&mut out).await?;
        Ok(out)
    }

    /// A healthy link forwards both ways.
    #[tokio::test]
    async fn forwards_both_ways_when_healthy() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut stream, b"hello").await.unwrap(), b"hello");
        assert_eq!(proxy.active_connections(), 1);
    }

    /// Latency delays each direction (fails if the toxic is ignored).
    #[tokio::test]
    async fn latency_delays_data() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        proxy.set_toxics(Toxics {
            latency: Duration::from_millis(150),
            ..Toxics::default()
        });
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = Instant::now();
        roundtrip(&mut stream, b"x").await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }

    /// Reset sends a RST to open connections, and new connections are reset while it holds.
    #[tokio::test]
    async fn reset_kills_open_and_new_connections() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut stream, b"x").await.unwrap();
        proxy.set_toxics(Toxics {
            reset: true,
            ..Toxics::default()
        });
        let mut buf = [0u8; 1];
        let res = timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("reset is prompt");
        assert!(
            matches!(res, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{res:?}"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let res = timeout(Duration::from_secs(5), roundtrip(&mut fresh, b"y"))
            .await
            .expect("prompt");
        assert!(res.is_err(), "a new connection must be reset: {res:?}");
    }

    /// A blackhole keeps the connection open but delivers nothing; healing restores flow.
    #[tokio::test]
    async fn blackhole_drops_data_silently() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set_toxics(Toxics {
            blackhole: true,
            ..Toxics::default()
        });
        let res = timeout(Duration::from_millis(300), roundtrip(&mut stream, b"lost")).await;
        assert!(res.is_err(), "no answer through a blackhole");
        proxy.heal();
        assert_eq!(roundtrip(&mut stream, b"back").await.unwrap(), b"back");
    }

    /// A partition holds data and new connections; after heal the held data arrives.
    #[tokio::test]
    async fn partition_holds_data_until_heal() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut stream, b"a").await.unwrap();
        proxy.set_toxics(Toxics {
            partition: true,
            ..Toxics::default()
        });
        stream.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        assert!(
            timeout(Duration::from_millis(300), stream.read_exact(&mut buf))
                .await
                .is_err()
        );
        proxy.heal();
        timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"held");
    }

    /// The slicer delivers data in chunks no larger than its size.
    #[tokio::test]
    async fn slicer_splits_data() {
        let (upstream, reads) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        proxy.set_toxics(Toxics {
            slicer_size: 4,
            slicer_delay: Duration::from_millis(20),
            direction: Direction::Upstream,
            ..Toxics::default()
        });
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut stream, b"0123456789abcdef").await.unwrap(),
            b"0123456789abcdef"
        );
        let reads = reads.lock().unwrap().clone();
        assert!(
            reads.len() >= 4 && reads.iter().all(|n| *n <= 4),
            "{reads:?}"
        );
    }

    /// Bandwidth limits throughput (8 KiB at 16 KiB/s takes at least ~0.5 s).
    #[tokio::test]
    async fn bandwidth_limits_throughput() {
        let (upstream, _) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        proxy.set_toxics(Toxics {
            bandwidth_kbps: 16,
            direction: Direction::Upstream,
            ..Toxics::default()
        });
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = Instant::now();
        roundtrip(&mut stream, &[7u8; 8192]).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
    }

    /// The upstream can move (a restarted gateway on a new port).
    #[tokio::test]
    async fn follows_a_moved_upstream() {
        let (first, _) = echo_server().await;
        let (second, second_reads) = echo_server().await;
        let proxy = FaultProxy::start(first).await.unwrap();
        proxy.set_upstream(second);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        roundtrip(&mut stream, b"z").await.unwrap();
        assert_eq!(second_reads.lock().unwrap().len(), 1);
    }
}
