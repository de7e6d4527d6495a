//! The agent listener before a connection's first byte.
//!
//! A handshake slot (`--max-concurrent-handshakes`) is taken only when handshake work can start,
//! that is once the ClientHello's first byte has arrived. A socket that is accepted with
//! nothing to read waits here, holding no slot, for at most `--hello-timeout`; one source
//! address may keep at most `--max-idle-per-source` such sockets, and when the whole listener's
//! allowance (four per handshake slot) is taken, the oldest idle socket is closed to make room.
//! So idle TCP connections, however many and from however many addresses, cannot keep real
//! agents from their handshakes, and cost one socket each for a few seconds.
//!
//! What this does not stop: a peer that sends a first byte and then stalls holds a slot until
//! the handshake timeout (10 s). The per-address cap is a cap on idle sockets only: agents
//! behind one NAT send their ClientHello at once and are never counted.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// Why an idle connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdleRefusal {
    /// Its source address already holds `max_idle_per_source` idle connections.
    #[error("too many connections from this address without a first byte")]
    PerSource,
}

impl IdleRefusal {
    /// The `reason` label of the rejection metric.
    pub fn reason(self) -> &'static str {
        match self {
            Self::PerSource => "idle_per_source",
        }
    }
}

/// Counts connections that have sent nothing yet, per source address and in all. When the
/// whole allowance is taken, a newcomer evicts the oldest idle connection instead of being
/// refused: an agent's ClientHello follows its connect within a round trip, so the oldest idle
/// sockets are the ones that were never going to speak, and an attacker holding the allowance
/// from many addresses cannot keep a newly connected agent out.
pub struct IdleGate {
    per_source: usize,
    total: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_source: HashMap<IpAddr, usize>,
    /// Oldest first.
    queue: VecDeque<Entry>,
    next_id: u64,
}

struct Entry {
    id: u64,
    source: IpAddr,
    evict: CancellationToken,
}

impl Inner {
    fn forget(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

impl IdleGate {
    /// A gate allowing `per_source` idle connections per address and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source: per_source.max(1),
            total: total.max(1),
            inner: Mutex::default(),
        })
    }

    /// Lets one more idle connection from `source` wait (evicting the oldest one when the gate
    /// is full), or refuses it when its address has its allowance already.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<IdleSlot, IdleRefusal> {
        let mut inner = self.inner.lock();
        if inner.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(IdleRefusal::PerSource);
        }
        while inner.queue.len() >= self.total {
            let Some(oldest) = inner.queue.pop_front() else {
                break;
            };
            inner.forget(oldest.source);
            oldest.evict.cancel();
        }
        let id = inner.next_id;
        inner.next_id += 1;
        *inner.by_source.entry(source).or_insert(0) += 1;
        let evicted = CancellationToken::new();
        inner.queue.push_back(Entry {
            id,
            source,
            evict: evicted.clone(),
        });
        Ok(IdleSlot {
            gate: self.clone(),
            id,
            source,
            evicted,
        })
    }

    /// Idle connections now.
    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One idle connection's place; leaving frees it.
pub struct IdleSlot {
    gate: Arc<IdleGate>,
    id: u64,
    source: IpAddr,
    evicted: CancellationToken,
}

impl IdleSlot {
    /// Resolves when a newer idle connection took this one's place.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

impl Drop for IdleSlot {
    fn drop(&mut self) {
        let mut inner = self.gate.inner.lock();
        // An evicted slot was already counted out.
        if let Some(at) = inner.queue.iter().position(|e| e.id == self.id) {
            inner.queue.remove(at);
            inner.forget(self.source);
        }
    }
}

/// Whether the peer has sent anything yet (a non-blocking peek; a closed or failed socket counts
/// as having something to say, which the handshake then reads).
pub fn has_first_byte(tcp: &tokio::net::TcpStream) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(tcp).peek(&mut buf) {
        Ok(_) => true,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Waits until the peer has sent something (or closed, or failed), without reading it.
/// (`TcpStream::readable` alone can wake without data: the peek is the check.)
pub async fn first_byte(tcp: &tokio::net::TcpStream) {
    let _ = tcp.peek(&mut [0u8; 1]).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_evicts_the_oldest_when_full_and_frees_on_drop() {
        let gate = IdleGate::new(2, 3);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let c: IpAddr = [127, 0, 0, 4].into();
        let a1 = gate.enter(a).expect("first");
        let a2 = gate.enter(a).expect("second");
        assert_eq!(gate.enter(a).err(), Some(IdleRefusal::PerSource));
        let b1 = gate.enter(b).expect("other address");
        assert_eq!(gate.len(), 3);
        let c1 = gate.enter(c).expect("full: the oldest makes room");
        assert!(a1.evicted.is_cancelled(), "the oldest was evicted");
        assert!(!a2.evicted.is_cancelled() && !b1.evicted.is_cancelled());
        assert_eq!(gate.len(), 3);
        drop(a1);
        assert_eq!(gate.len(), 3, "an evicted slot is counted out once");
        let _a3 = gate.enter(a).expect("a has one idle connection now");
        assert!(a2.evicted.is_cancelled());
        drop((b1, c1));
        assert_eq!(gate.len(), 1);
        assert_eq!(gate.inner.lock().by_source.len(), 1);
    }

    #[tokio::test]
    async fn first_byte_is_seen_without_reading_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert!(!has_first_byte(&server));
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(100), first_byte(&server)).await;
        assert!(waiting.is_err(), "no first byte yet");
        client.write_all(b"x").await.unwrap();
        first_byte(&server).await;
        assert!(has_first_byte(&server));
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x", "the peek left the byte in place");
    }
}
