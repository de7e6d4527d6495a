//! How many live connections one party may hold: one agent key, one planeID, one clientCA.
//!
//! A tenant can mint any number of keys from its own CA, so the cap per key alone bounds
//! nothing; the caps per planeID and per CA bound what one tenant's agents can make the gateway
//! hold. The admission callback checks them before the WebSocket upgrade (a clear 429), and
//! [`Registry::try_add`](crate::registry::Registry::try_add) checks them again under the
//! registry's lock, so concurrent handshakes cannot together exceed a cap.

use std::collections::{BTreeSet, HashMap};

use buildplane_pki::CaId;

/// Caps on live connections; 0 means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Per leaf public key (an agent's identity), excluding the instance being replaced.
    pub per_identity: usize,
    /// Per planeID.
    pub per_plane: usize,
    /// Per clientCA that verified the chain.
    pub per_ca: usize,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self {
            per_identity: 4,
            per_plane: 64,
            per_ca: 10_000,
        }
    }
}

/// A connection that would exceed a cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    /// The agent's key already holds this many connections.
    #[error("this certificate already has {0} connections; retry later")]
    Identity(usize),
    /// The planeID already has this many connections.
    #[error("this planeID already has {0} connections; retry later")]
    Plane(usize),
    /// The CA that verified the certificate already has this many connections.
    #[error("agents of this certificate's CA already hold {0} connections; retry later")]
    Ca(usize),
}

impl CapExceeded {
    /// The `reason` label of the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Identity(_) => "identity_cap",
            Self::Plane(_) => "plane_cap",
            Self::Ca(_) => "ca_cap",
        }
    }
}

/// Who a new connection would be, for the cap checks.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The planeID it connects for.
    pub plane_id: &'a str,
    /// Its leaf's public key.
    pub public_key: &'a [u8],
    /// Its instance id (`agentID`), empty for OpenChoreo agents.
    pub agent_id: &'a str,
    /// The clientCAs that verified its chain.
    pub cas: &'a BTreeSet<CaId>,
}

/// Live connection counts per key and per CA (per planeID is the plane's own list).
#[derive(Default)]
pub struct Counts {
    by_identity: HashMap<Vec<u8>, usize>,
    by_ca: HashMap<CaId, usize>,
}

impl Counts {
    /// Counts a connection in.
    pub fn add(&mut self, public_key: &[u8], cas: &BTreeSet<CaId>) {
        *self.by_identity.entry(public_key.to_vec()).or_insert(0) += 1;
        for ca in cas {
            *self.by_ca.entry(ca.clone()).or_insert(0) += 1;
        }
    }

    /// Counts a connection out.
    pub fn remove(&mut self, public_key: &[u8], cas: &BTreeSet<CaId>) {
        decrement(&mut self.by_identity, public_key);
        for ca in cas {
            decrement(&mut self.by_ca, ca);
        }
    }

    /// Live connections of `public_key`.
    pub fn identity(&self, public_key: &[u8]) -> usize {
        self.by_identity.get(public_key).copied().unwrap_or(0)
    }

    /// Live connections verified by `ca`.
    pub fn ca(&self, ca: &CaId) -> usize {
        self.by_ca.get(ca).copied().unwrap_or(0)
    }
}

fn decrement<K, Q>(map: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl ConnectionCaps {
    /// Checks a candidate against the counts. `on_plane` is the plane's live connections,
    /// `replaced` those of them the candidate would replace (its own earlier instance), which
    /// leave as it arrives and so do not count against it.
    pub fn check(
        &self,
        counts: &Counts,
        candidate: &Candidate<'_>,
        on_plane: usize,
        replaced: &ReplacedCounts,
    ) -> Result<(), CapExceeded> {
        let over = |cap: usize, count: usize| cap != 0 && count >= cap;
        let identity = counts
            .identity(candidate.public_key)
            .saturating_sub(replaced.identity);
        if over(self.per_identity, identity) {
            return Err(CapExceeded::Identity(self.per_identity));
        }
        if over(self.per_plane, on_plane.saturating_sub(replaced.plane)) {
            return Err(CapExceeded::Plane(self.per_plane));
        }
        for ca in candidate.cas {
            let leaving = replaced.cas.get(ca).copied().unwrap_or(0);
            if over(self.per_ca, counts.ca(ca).saturating_sub(leaving)) {
                return Err(CapExceeded::Ca(self.per_ca));
            }
        }
        Ok(())
    }
}

/// What the connections a candidate replaces held, so a reconnect never trips a cap.
#[derive(Debug, Default)]
pub struct ReplacedCounts {
    /// Replaced connections of the candidate's key.
    pub identity: usize,
    /// Replaced connections on the candidate's plane.
    pub plane: usize,
    /// Replaced connections per CA.
    pub cas: HashMap<CaId, usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(byte: u8) -> CaId {
        CaId::from_public_key(&[byte])
    }

    #[test]
    fn zero_means_no_cap() {
        let caps = ConnectionCaps {
            per_identity: 0,
            per_plane: 0,
            per_ca: 0,
        };
        let mut counts = Counts::default();
        let cas = BTreeSet::from([ca(1)]);
        for _ in 0..100 {
            counts.add(b"k", &cas);
        }
        let candidate = Candidate {
            plane_id: "p",
            public_key: b"k",
            agent_id: "",
            cas: &cas,
        };
        assert_eq!(
            caps.check(&counts, &candidate, 100, &ReplacedCounts::default()),
            Ok(())
        );
    }

    #[test]
    fn each_cap_refuses_at_its_count_and_a_replacement_does_not_count() {
        let caps = ConnectionCaps {
            per_identity: 2,
            per_plane: 3,
            per_ca: 4,
        };
        let cas = BTreeSet::from([ca(1)]);
        let mut counts = Counts::default();
        counts.add(b"k", &cas);
        counts.add(b"k", &cas);
        let same_key = Candidate {
            plane_id: "p",
            public_key: b"k",
            agent_id: "a",
            cas: &cas,
        };
        let none = ReplacedCounts::default();
        assert_eq!(
            caps.check(&counts, &same_key, 2, &none),
            Err(CapExceeded::Identity(2))
        );
        let replacing = ReplacedCounts {
            identity: 1,
            plane: 1,
            cas: HashMap::from([(ca(1), 1)]),
        };
        assert_eq!(caps.check(&counts, &same_key, 2, &replacing), Ok(()));

        let other_key = Candidate {
            public_key: b"other",
            ..same_key
        };
        assert_eq!(
            caps.check(&counts, &other_key, 3, &none),
            Err(CapExceeded::Plane(3))
        );
        counts.add(b"x", &cas);
        counts.add(b"y", &cas);
        assert_eq!(
            caps.check(&counts, &other_key, 0, &none),
            Err(CapExceeded::Ca(4))
        );
        let other_ca = BTreeSet::from([ca(2)]);
        let fresh = Candidate {
            cas: &other_ca,
            ..other_key
        };
        assert_eq!(caps.check(&counts, &fresh, 0, &none), Ok(()));

        counts.remove(b"x", &cas);
        assert_eq!(caps.check(&counts, &other_key, 0, &none), Ok(()));
        assert_eq!(counts.ca(&ca(1)), 3);
        assert_eq!(counts.identity(b"x"), 0);
    }
}
