//! A TCP round-robin balancer in front of gateway replicas, as a Kubernetes Service is for the
//! benches: each new connection goes, once the client has sent its first bytes, to the next
//! backend in rotation that accepts it (a backend that refuses, one being restarted, is
//! skipped); bytes are relayed as they are, TLS included. With no backend accepting, the
//! inbound connection is closed.
//!
//! It is a user-space hop (two more socket copies per direction and a task per connection),
//! which a Service's kernel NAT does not cost; the benches measure through it, so its cost
//! counts against the replicas, never for them. `buildplane-bench balance` runs one as a
//! process (the restart storm puts one beside each swarm process, so that no process holds
//! more than 20,000 sockets).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// Relay buffer per direction: one TLS record.
const BUFFER: usize = 16 * 1024;

/// Counts of a balancer so far.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct BalancerStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections relayed to a backend.
    pub relayed: u64,
    /// Connections closed because no backend accepted them.
    pub unreachable: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    relayed: AtomicU64,
    unreachable: AtomicU64,
}

/// A balanced address; stops when dropped (live relays end with the runtime or their ends).
pub struct Balancer {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    stop: CancellationToken,
}

impl Balancer {
    /// Listens on `listen` (port 0: any) and balances over `backends`.
    pub async fn start(listen: SocketAddr, backends: Vec<SocketAddr>) -> std::io::Result<Balancer> {
        check_backends(&backends)?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let backends: Arc<[SocketAddr]> = backends.into();
        let next = AtomicUsize::new(0);
        let (count, stopped) = (counters.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped.cancelled() => return,
                };
                let Ok((inbound, _)) = accepted else {
                    // Out of file descriptors: give the relays a moment to close some.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                count.accepted.fetch_add(1, Ordering::Relaxed);
                let first = next.fetch_add(1, Ordering::Relaxed);
                let (backends, count, stopped) = (backends.clone(), count.clone(), stopped.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = relay(inbound, &backends, first, &count) => {}
                        () = stopped.cancelled() => {}
                    }
                });
            }
        });
        Ok(Balancer {
            addr,
            counters,
            stop,
        })
    }

    /// Counts so far.
    pub fn stats(&self) -> BalancerStats {
        BalancerStats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            relayed: self.counters.relayed.load(Ordering::Relaxed),
            unreachable: self.counters.unreachable.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn check_backends(backends: &[SocketAddr]) -> std::io::Result<()> {
    if backends.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a balancer needs at least one backend",
        ));
    }
    Ok(())
}

/// Waits for the client's first bytes, then connects to the first backend from `first` on (in
/// rotation) that accepts, hands it those bytes and relays until either end closes. Dialing
/// only once the client has spoken keeps the backend's view as through a Service's NAT: its
/// ClientHello follows the connection at once. (A relay that dials first leaves the gateway a
/// socket that has not spoken for as long as the relay takes to copy; thousands at once from
/// the balancer's one address fill the gateway's allowance of silent sockets per source, and
/// it refuses them, which no agent behind a Service would meet.)
async fn relay(mut inbound: TcpStream, backends: &[SocketAddr], first: usize, count: &Counters) {
    let mut hello = vec![0u8; BUFFER];
    let n = match inbound.read(&mut hello).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    let backends_n = backends.len();
    for k in 0..backends_n {
        let Ok(mut outbound) = TcpStream::connect(backends[(first + k) % backends_n]).await else {
            continue;
        };
        count.relayed.fetch_add(1, Ordering::Relaxed);
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        if outbound.write_all(&hello[..n]).await.is_err() {
            return;
        }
        drop(hello);
        let _ =
            tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, BUFFER, BUFFER)
                .await;
        return;
    }
    count.unreachable.fetch_add(1, Ordering::Relaxed);
}

/// `buildplane-bench balance`: balances `listen` over `backends` until SIGTERM or SIGINT, then
/// prints its counts as one JSON line.
pub async fn serve(listen: SocketAddr, backends: Vec<SocketAddr>) -> anyhow::Result<BalancerStats> {
    let balancer = Balancer::start(listen, backends).await?;
    buildplane_runtime::shutdown_signal().await;
    Ok(balancer.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that answers every connection's first byte with its own index.
    async fn backend(index: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut byte = [0u8];
                    if tcp.read_exact(&mut byte).await.is_ok() {
                        let _ = tcp.write_all(&[index]).await;
                    }
                });
            }
        });
        addr
    }

    async fn reached(addr: SocketAddr) -> Option<u8> {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"?").await.ok()?;
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.ok()?;
        Some(byte[0])
    }

    /// Round robin over the backends; one that refuses connections is skipped; with none
    /// accepting, the connection is closed and counted.
    #[tokio::test]
    async fn round_robin_skips_a_backend_that_refuses() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let backends = vec![backend(0).await, dead_addr, backend(2).await];
        let balancer = Balancer::start("127.0.0.1:0".parse().unwrap(), backends)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(reached(balancer.addr).await.unwrap());
        }
        // The refusing backend's turns go to the next one.
        assert_eq!(seen.iter().filter(|&&i| i == 0).count(), 2, "{seen:?}");
        assert_eq!(seen.iter().filter(|&&i| i == 2).count(), 4, "{seen:?}");
        let stats = balancer.stats();
        assert_eq!(
            (stats.accepted, stats.relayed, stats.unreachable),
            (6, 6, 0)
        );

        let nobody = Balancer::start("127.0.0.1:0".parse().unwrap(), vec![dead_addr])
            .await
            .unwrap();
        assert_eq!(reached(nobody.addr).await, None);
        assert_eq!(nobody.stats().unreachable, 1);
    }
}
