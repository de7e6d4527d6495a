//! A TCP load balancer in front of the gateway replicas, as a Kubernetes Service is: each new
//! connection goes to the next replica in rotation (round robin) that accepts it; a replica
//! taken out of rotation (not ready, being stopped) gets no new connection, and its live ones
//! stay until either end closes them. Bytes are relayed as they are, TLS included.
//!
//! A replica can be partitioned from the balancer's clients ([`Balancer::set_partitioned`]):
//! its relays, live and new, stop moving bytes either way without closing anything (bytes wait
//! in the kernel's buffers, a new connection waits before it reaches the replica), as a network
//! partition holds a path; healed, everything flows again, in order.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, tcp},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Backend {
    addr: SocketAddr,
    in_rotation: bool,
    /// True while the backend is partitioned from the balancer's clients.
    partitioned: Arc<watch::Sender<bool>>,
}

/// One balanced address.
#[derive(Debug)]
pub struct Balancer {
    addr: SocketAddr,
    backends: Arc<parking_lot::Mutex<Vec<Backend>>>,
    stop: CancellationToken,
}

impl Balancer {
    /// Listens on `listen` (port 0: any) for `backends`, all out of rotation until
    /// [`Balancer::set_in_rotation`].
    pub async fn start(listen: SocketAddr, backends: &[SocketAddr]) -> std::io::Result<Balancer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(parking_lot::Mutex::new(
            backends
                .iter()
                .map(|&addr| Backend {
                    addr,
                    in_rotation: false,
                    partitioned: Arc::new(watch::Sender::new(false)),
                })
                .collect::<Vec<_>>(),
        ));
        let stop = CancellationToken::new();
        let table = backends.clone();
        let stopped = stop.clone();
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped.cancelled() => return,
                };
                let Ok((inbound, _)) = accepted else {
                    // Out of file descriptors: give the relays a moment to close some.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                let candidates: Vec<(SocketAddr, watch::Receiver<bool>)> = table
                    .lock()
                    .iter()
                    .filter(|b| b.in_rotation)
                    .map(|b| (b.addr, b.partitioned.subscribe()))
                    .collect();
                let first = next.fetch_add(1, Ordering::Relaxed);
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = relay(inbound, candidates, first) => {}
                        () = stopped.cancelled() => {}
                    }
                });
            }
        });
        Ok(Balancer {
            addr,
            backends,
            stop,
        })
    }

    /// The balanced address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Puts backend `index` in rotation (ready) or takes it out (new connections go elsewhere).
    pub fn set_in_rotation(&self, index: usize, in_rotation: bool) {
        if let Some(backend) = self.backends.lock().get_mut(index) {
            backend.in_rotation = in_rotation;
        }
    }

    /// Partitions backend `index` from the balancer's clients, or heals it: its relays, live
    /// and new, hold their bytes (nothing is closed) until healed. It stays in rotation: the
    /// clients cannot tell.
    pub fn set_partitioned(&self, index: usize, partitioned: bool) {
        if let Some(backend) = self.backends.lock().get(index) {
            backend.partitioned.send_replace(partitioned);
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects to the first candidate from `first` on that accepts and relays until either end
/// closes; with none accepting, the inbound connection is closed. A partitioned candidate is
/// reached only once healed (the client waits, as behind a partition).
async fn relay(
    inbound: TcpStream,
    candidates: Vec<(SocketAddr, watch::Receiver<bool>)>,
    first: usize,
) {
    let n = candidates.len();
    for k in 0..n {
        let (backend, mut partitioned) = candidates[(first + k) % n].clone();
        if partitioned.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if let Ok(outbound) = TcpStream::connect(backend).await {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (client_read, client_write) = inbound.into_split();
            let (backend_read, backend_write) = outbound.into_split();
            tokio::join!(
                copy(client_read, backend_write, partitioned.clone()),
                copy(backend_read, client_write, partitioned),
            );
            return;
        }
    }
}

/// Copies one direction until end of stream, moving nothing while partitioned (bytes read
/// just before the partition cross once it heals).
async fn copy(
    mut from: tcp::OwnedReadHalf,
    mut to: tcp::OwnedWriteHalf,
    mut partitioned: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if partitioned.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if partitioned.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A backend that answers every connection with its own index.
    async fn backend(index: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp.write_all(&[index]).await;
            }
        });
        addr
    }

    async fn reached(addr: SocketAddr) -> Option<u8> {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.ok()?;
        Some(byte[0])
    }

    /// Round robin over the backends in rotation; one out of rotation gets nothing, one that
    /// refuses connections is skipped.
    #[tokio::test]
    async fn round_robin_over_the_backends_in_rotation() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let backends = [
            backend(0).await,
            backend(1).await,
            dead_addr,
            backend(3).await,
        ];
        let balancer = Balancer::start("127.0.0.1:0".parse().unwrap(), &backends)
            .await
            .unwrap();
        assert_eq!(reached(balancer.addr()).await, None, "nothing in rotation");
        for i in 0..4 {
            balancer.set_in_rotation(i, true);
        }
        balancer.set_in_rotation(1, false);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(reached(balancer.addr()).await.unwrap());
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, [0, 3], "1 is out of rotation, 2 refuses connections");
    }

    /// A partitioned backend's live relays carry nothing either way and close nothing; new
    /// connections to it wait; healed, the held bytes arrive in order.
    #[tokio::test]
    async fn a_partitioned_backend_holds_its_relays_until_healed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = tcp.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let balancer = Balancer::start("127.0.0.1:0".parse().unwrap(), &[echo])
            .await
            .unwrap();
        balancer.set_in_rotation(0, true);
        let mut live = TcpStream::connect(balancer.addr()).await.unwrap();
        let mut byte = [0u8];
        live.write_all(b"a").await.unwrap();
        live.read_exact(&mut byte).await.unwrap();
        balancer.set_partitioned(0, true);
        live.write_all(b"b").await.unwrap();
        let mut fresh = TcpStream::connect(balancer.addr()).await.unwrap();
        fresh.write_all(b"c").await.unwrap();
        let wait = std::time::Duration::from_millis(300);
        assert!(
            tokio::time::timeout(wait, live.read_exact(&mut byte))
                .await
                .is_err(),
            "nothing crosses a partition, and nothing is closed"
        );
        assert!(
            tokio::time::timeout(wait, fresh.read_exact(&mut byte))
                .await
                .is_err()
        );
        balancer.set_partitioned(0, false);
        live.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"b");
        fresh.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"c");
    }
}
