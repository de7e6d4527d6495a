//! A TCP load balancer in front of the gateway replicas, as a Kubernetes Service is: each new
//! connection goes to the next replica in rotation (round robin) that accepts it; a replica
//! taken out of rotation (not ready, being stopped) gets no new connection, and its live ones
//! stay until either end closes them. Bytes are relayed as they are, TLS included.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
struct Backend {
    addr: SocketAddr,
    in_rotation: bool,
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
                let candidates: Vec<SocketAddr> = table
                    .lock()
                    .iter()
                    .filter(|b| b.in_rotation)
                    .map(|b| b.addr)
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
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects to the first candidate from `first` on that accepts and relays until either end
/// closes; with none accepting, the inbound connection is closed.
async fn relay(mut inbound: TcpStream, candidates: Vec<SocketAddr>, first: usize) {
    let n = candidates.len();
    for k in 0..n {
        let backend = candidates[(first + k) % n];
        if let Ok(mut outbound) = TcpStream::connect(backend).await {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            return;
        }
    }
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
}
