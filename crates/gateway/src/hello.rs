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
//! "Handshake work can start" means the whole first TLS record (the ClientHello) is here: a peer
//! that sends one byte, or most of a ClientHello, and then stalls waits without a slot too, and
//! is closed at `--hello-timeout`. After the ClientHello the server speaks next, and a peer that
//! stalls from then on holds its slot until the handshake timeout (10 s). The per-address cap is
//! a cap on idle sockets only: agents behind one NAT send their ClientHello at once and are
//! never counted.

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

/// The most a TLS record can hold: its 5-byte header and 2^14 bytes plus the 2,048 a
/// compressed or encrypted record may add (RFC 8446, 5.2). A ClientHello fits in one.
const MAX_RECORD: usize = 5 + (1 << 14) + 2048;

/// How often a socket whose first record is incomplete is looked at again.
const PARTIAL_RECORD_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// What the bytes received so far say about the first TLS record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRecord {
    /// Nothing yet, or part of a handshake record: waiting costs no slot.
    Incomplete,
    /// The whole record is here (or the peer speaks something else than TLS, or closed, or
    /// failed): the handshake can run to its end without waiting on the peer.
    Ready,
}

impl FirstRecord {
    /// Judges the bytes peeked so far; `closed` when the peer has closed or failed.
    pub fn of(peeked: &[u8], closed: bool) -> FirstRecord {
        const HANDSHAKE: u8 = 0x16;
        match peeked {
            _ if closed => FirstRecord::Ready,
            [] => FirstRecord::Incomplete,
            [kind, ..] if *kind != HANDSHAKE => FirstRecord::Ready,
            [_, _, _, high, low, body @ ..] => {
                let length = usize::from(u16::from_be_bytes([*high, *low]));
                if body.len() >= length || 5 + length > MAX_RECORD {
                    FirstRecord::Ready
                } else {
                    FirstRecord::Incomplete
                }
            }
            _ => FirstRecord::Incomplete,
        }
    }
}

/// Whether the peer's first TLS record (its ClientHello) has fully arrived, by a non-blocking
/// peek. A closed or failed socket counts as ready: the handshake then reads the end. The
/// socket goes through its std form for the peek (std's peek is safe to read from; tokio has
/// no non-blocking one), so it comes back re-registered, or not at all if that fails.
pub fn has_first_record(
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, bool)> {
    let std = tcp.into_std()?;
    let mut buf = vec![0u8; MAX_RECORD];
    let ready = match std.peek(&mut buf) {
        Ok(0) => true,
        Ok(n) => FirstRecord::of(&buf[..n], false) == FirstRecord::Ready,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    };
    Ok((tokio::net::TcpStream::from_std(std)?, ready))
}

/// Waits until the peer's first TLS record has fully arrived (or the peer closed, failed, or
/// speaks something else), without reading it. So a peer that sends a byte and stalls waits
/// here, without a handshake slot, until `--hello-timeout` closes it.
/// (`TcpStream::readable` alone can wake without data: the peek is the check.)
pub async fn first_record(tcp: &tokio::net::TcpStream) {
    let mut buf = vec![0u8; MAX_RECORD];
    loop {
        let (peeked, closed) = match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => (&buf[..0], true),
            Ok(n) => (&buf[..n], false),
        };
        if FirstRecord::of(peeked, closed) == FirstRecord::Ready {
            return;
        }
        // Part of the record is here: a peek would return at once, so look again shortly.
        tokio::time::sleep(PARTIAL_RECORD_POLL).await;
    }
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

    #[test]
    fn a_record_is_ready_only_when_whole() {
        use FirstRecord::{Incomplete, Ready};
        let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x04];
        assert_eq!(FirstRecord::of(&[], false), Incomplete);
        assert_eq!(FirstRecord::of(&[], true), Ready, "closed");
        assert_eq!(FirstRecord::of(&hello[..1], false), Incomplete, "one byte");
        assert_eq!(FirstRecord::of(&hello, false), Incomplete, "header only");
        hello.extend([1, 2, 3]);
        assert_eq!(FirstRecord::of(&hello, false), Incomplete, "3 of 4 bytes");
        hello.push(4);
        assert_eq!(FirstRecord::of(&hello, false), Ready);
        assert_eq!(FirstRecord::of(b"GET / HTTP/1.1", false), Ready, "not TLS");
        let oversized = [0x16, 0x03, 0x01, 0xff, 0xff];
        assert_eq!(
            FirstRecord::of(&oversized, false),
            Ready,
            "the handshake refuses it"
        );
    }

    #[tokio::test]
    async fn the_first_record_is_seen_whole_without_reading_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut server, ready) = has_first_record(server).unwrap();
        assert!(!ready);
        let record = [0x16, 0x03, 0x01, 0x00, 0x02, 0xaa, 0xbb];
        // One byte, then all but the last: a stalled ClientHello is still waiting.
        for (from, to) in [(0, 1), (1, 6)] {
            client.write_all(&record[from..to]).await.unwrap();
            let waiting =
                tokio::time::timeout(std::time::Duration::from_millis(100), first_record(&server))
                    .await;
            assert!(waiting.is_err(), "{to} bytes are not the whole record");
            let (back, ready) = has_first_record(server).unwrap();
            assert!(!ready, "{to} bytes are not the whole record");
            server = back;
        }
        client.write_all(&record[6..]).await.unwrap();
        first_record(&server).await;
        let (mut server, ready) = has_first_record(server).unwrap();
        assert!(ready);
        let mut bytes = [0u8; 7];
        server.read_exact(&mut bytes).await.unwrap();
        assert_eq!(bytes, record, "the peeks left the bytes in place");
    }
}
