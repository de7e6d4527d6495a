//! Verdicts remembered by (presented chain, clientCA bundle): a chain seen before against a bundle
//! seen before costs two SHA-256 digests and a lookup, not a path search and signature checks.
//!
//! # When a remembered verdict still holds
//! Verification depends on the chain, the bundle and the time, and on the time only through
//! whether each certificate involved (presented or in the bundle) is inside its validity period:
//! webpki checks each presented certificate's, `anchor_limits` each bundle certificate's, and
//! nothing else reads the clock. So a verdict reached at `t` holds at any `now` at which every one
//! of those certificates is on the same side of its `notBefore` and `notAfter` as at `t`: the
//! entry keeps that window (the latest boundary at or before `t`, the earliest after it) and a
//! lookup outside it is a miss. A rotation bundle holding an expired CA is cached as well as any
//! other; a verdict can never outlive the expiry of the leaf it admitted.
//!
//! A chain whose validity cannot be read (not DER) is never remembered; its verdict is cheap.
//!
//! # Bounded
//! Two generations of at most `capacity / 2` entries each: an insert into a full current
//! generation makes it the old one and drops the previous old one; a hit in the old generation
//! moves the entry back. Memory stays under `capacity` entries, and what is used survives.

use std::collections::HashMap;

use parking_lot::Mutex;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{CaId, ClientCaBundle, VerifyError};

/// A SHA-256 digest.
type Digest = [u8; 32];

/// Entries a gateway keeps by default: a verdict per connection for a large fleet, with room for
/// a bundle rotation (two verdicts per chain for a while).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The key of a remembered verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    chain: Digest,
    bundle: Digest,
}

/// A verdict and the times between which it holds (inclusive bounds, seconds since the epoch).
#[derive(Debug, Clone)]
struct Entry {
    verdict: Result<CaId, VerifyError>,
    from: u64,
    until: u64,
}

impl Entry {
    fn holds_at(&self, now: u64) -> bool {
        self.from <= now && now <= self.until
    }
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<Key, Entry>,
    previous: HashMap<Key, Entry>,
}

/// Counts of a [`VerdictCache`]'s lookups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that verified.
    pub misses: u64,
    /// Entries held now.
    pub entries: usize,
}

/// Verdicts by (presented chain, bundle), shared by every verification of a gateway.
#[derive(Debug)]
pub struct VerdictCache {
    generations: Mutex<Generations>,
    capacity: usize,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl VerdictCache {
    /// A cache of at most `capacity` verdicts; 0 remembers nothing (every verification runs).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            generations: Mutex::new(Generations::default()),
            capacity,
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// Lookups so far and entries now.
    pub fn stats(&self) -> VerdictStats {
        let generations = self.generations.lock();
        VerdictStats {
            hits: self.hits.load(std::sync::atomic::Ordering::Relaxed),
            misses: self.misses.load(std::sync::atomic::Ordering::Relaxed),
            entries: generations.current.len() + generations.previous.len(),
        }
    }

    /// [`ClientCaBundle::verify_client_anchor`], answered from the cache when the same chain met
    /// the same bundle before and no certificate involved has crossed a validity boundary since.
    pub fn verify(
        &self,
        bundle: &ClientCaBundle,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CaId, VerifyError> {
        let key = Key {
            chain: chain_digest(end_entity, intermediates),
            bundle: bundle.digest(),
        };
        if self.capacity == 0 {
            self.misses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return bundle.verify_client_anchor(end_entity, intermediates, now);
        }
        let now_s = now.as_secs();
        if let Some(verdict) = self.lookup(&key, now_s) {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return verdict;
        }
        self.misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let verdict = bundle.verify_client_anchor(end_entity, intermediates, now);
        let involved = std::iter::once(end_entity.as_ref())
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .chain(bundle.certs().iter().map(|c| c.as_ref()));
        if let Some((from, until)) = window(involved, now_s) {
            self.insert(
                key,
                Entry {
                    verdict: verdict.clone(),
                    from,
                    until,
                },
            );
        }
        verdict
    }

    fn lookup(&self, key: &Key, now: u64) -> Option<Result<CaId, VerifyError>> {
        let mut generations = self.generations.lock();
        if let Some(entry) = generations.current.get(key) {
            return entry.holds_at(now).then(|| entry.verdict.clone());
        }
        let entry = generations.previous.remove(key)?;
        if !entry.holds_at(now) {
            return None;
        }
        let verdict = entry.verdict.clone();
        Self::put(&mut generations, self.capacity, *key, entry);
        Some(verdict)
    }

    fn insert(&self, key: Key, entry: Entry) {
        let mut generations = self.generations.lock();
        generations.previous.remove(&key);
        Self::put(&mut generations, self.capacity, key, entry);
    }

    fn put(generations: &mut Generations, capacity: usize, key: Key, entry: Entry) {
        let half = (capacity / 2).max(1);
        if generations.current.len() >= half && !generations.current.contains_key(&key) {
            generations.previous = std::mem::take(&mut generations.current);
        }
        generations.current.insert(key, entry);
    }
}

/// The digest of a presented chain (each certificate length-prefixed, so no two chains share an
/// encoding).
fn chain_digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Digest {
    digest_ders(
        std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref())),
    )
}

/// SHA-256 over length-prefixed certificates (DER).
pub(crate) fn digest_ders<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Digest {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for cert in certs {
        context.update(&(cert.len() as u64).to_be_bytes());
        context.update(cert);
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(context.finish().as_ref());
    digest
}

/// The widest time window around `now` in which no certificate of `certs` crosses its
/// `notBefore` or `notAfter` (inclusive bounds, seconds), or `None` when one cannot be parsed.
fn window<'a>(certs: impl Iterator<Item = &'a [u8]>, now: u64) -> Option<(u64, u64)> {
    let now = i64::try_from(now).ok()?;
    let (mut from, mut until) = (i64::MIN, i64::MAX);
    for der in certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        let not_before = validity.not_before.timestamp();
        let not_after = validity.not_after.timestamp();
        // The certificate is "not yet valid" for t < notBefore, valid for notBefore <= t <=
        // notAfter, and "expired" for t > notAfter: the three stretches `now` can fall in.
        let (lo, hi) = if now < not_before {
            (i64::MIN, not_before - 1)
        } else if now <= not_after {
            (not_before, not_after)
        } else {
            (not_after.saturating_add(1), i64::MAX)
        };
        from = from.max(lo);
        until = until.min(hi);
    }
    Some((
        u64::try_from(from).unwrap_or(0),
        u64::try_from(until).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Ca, Validity, parse_cert_bundle};

    const DAY: u64 = 86_400;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    fn unix_now() -> u64 {
        UnixTime::now().as_secs()
    }

    /// A leaf valid for one more day: accepted now from the cache, and at the day after its
    /// expiry `Expired`, not the remembered acceptance. Without the window check the second
    /// verdict is `Ok`.
    #[test]
    fn a_remembered_acceptance_ends_when_the_leaf_expires() {
        let now = unix_now();
        let ca = Ca::generate("agent-ca", Duration::from_secs(3650 * DAY)).expect("ca");
        let leaf = ca
            .issue_client_with(
                "plane-1",
                Validity {
                    not_before: now as i64 - DAY as i64,
                    not_after: now as i64 + DAY as i64,
                },
                &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
            )
            .expect("leaf");
        let chain = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
        let bundle = ClientCaBundle::from_pem(ca.cert_pem().as_bytes()).expect("bundle");
        let cache = VerdictCache::default();

        assert!(cache.verify(&bundle, &chain[0], &[], at(now)).is_ok());
        assert!(cache.verify(&bundle, &chain[0], &[], at(now + 60)).is_ok());
        assert_eq!(
            cache.stats(),
            VerdictStats {
                hits: 1,
                misses: 1,
                entries: 1
            }
        );
        assert_eq!(
            cache.verify(&bundle, &chain[0], &[], at(now + 2 * DAY)),
            Err(VerifyError::Expired)
        );
        assert_eq!(
            cache.verify(&bundle, &chain[0], &[], at(now - 2 * DAY)),
            Err(VerifyError::NotYetValid)
        );
        assert_eq!(cache.stats().hits, 1, "out of the window is a miss");
    }

    /// A rotation bundle with an expired old CA: a leaf of the new CA is still remembered (the
    /// expired CA stays expired inside the window).
    #[test]
    fn a_bundle_with_an_expired_ca_is_remembered_too() {
        let now = unix_now() as i64;
        let old = Ca::generate_with(
            "old-ca",
            Validity {
                not_before: now - 10 * DAY as i64,
                not_after: now - DAY as i64,
            },
        )
        .expect("old");
        let new = Ca::generate("new-ca", Duration::from_secs(3650 * DAY)).expect("new");
        let leaf = new
            .issue_client("plane-1", Duration::from_secs(DAY))
            .expect("leaf");
        let chain = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
        let bundle =
            ClientCaBundle::from_pem(format!("{}{}", old.cert_pem(), new.cert_pem()).as_bytes())
                .expect("bundle");
        let cache = VerdictCache::default();
        for _ in 0..3 {
            assert!(
                cache
                    .verify(&bundle, &chain[0], &[], UnixTime::now())
                    .is_ok()
            );
        }
        assert_eq!(cache.stats().hits, 2);
    }

    /// The same chain against another bundle is another entry; capacity bounds the entries.
    #[test]
    fn entries_are_per_bundle_and_bounded() {
        let ca = Ca::generate("agent-ca", Duration::from_secs(3650 * DAY)).expect("ca");
        let other = Ca::generate("other-ca", Duration::from_secs(3650 * DAY)).expect("other");
        let bundle = ClientCaBundle::from_pem(ca.cert_pem().as_bytes()).expect("bundle");
        let foreign = ClientCaBundle::from_pem(other.cert_pem().as_bytes()).expect("foreign");
        let cache = VerdictCache::with_capacity(4);
        let leaves: Vec<_> = (0..5)
            .map(|i| {
                let leaf = ca
                    .issue_client(&format!("plane-{i}"), Duration::from_secs(DAY))
                    .expect("leaf");
                parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain")
            })
            .collect();
        let now = UnixTime::now();
        assert!(cache.verify(&bundle, &leaves[0][0], &[], now).is_ok());
        assert_eq!(
            cache.verify(&foreign, &leaves[0][0], &[], now),
            Err(VerifyError::UnknownIssuer),
            "a verdict of one bundle never answers for another"
        );
        for leaf in &leaves {
            assert!(cache.verify(&bundle, &leaf[0], &[], now).is_ok());
            assert!(cache.stats().entries <= 4);
        }
        // The last two inserted are still there.
        let before = cache.stats().hits;
        assert!(cache.verify(&bundle, &leaves[4][0], &[], now).is_ok());
        assert!(cache.verify(&bundle, &leaves[3][0], &[], now).is_ok());
        assert_eq!(cache.stats().hits, before + 2);
    }

    /// Capacity 0 remembers nothing.
    #[test]
    fn capacity_zero_is_off() {
        let ca = Ca::generate("agent-ca", Duration::from_secs(DAY)).expect("ca");
        let leaf = ca
            .issue_client("p", Duration::from_secs(DAY))
            .expect("leaf");
        let chain = parse_cert_bundle(leaf.cert_pem.as_bytes()).expect("chain");
        let bundle = ClientCaBundle::from_pem(ca.cert_pem().as_bytes()).expect("bundle");
        let cache = VerdictCache::with_capacity(0);
        for _ in 0..3 {
            assert!(
                cache
                    .verify(&bundle, &chain[0], &[], UnixTime::now())
                    .is_ok()
            );
        }
        assert_eq!(
            cache.stats(),
            VerdictStats {
                hits: 0,
                misses: 3,
                entries: 0
            }
        );
    }

    #[test]
    fn the_window_is_the_stretch_where_no_certificate_changes_state() {
        let now = unix_now() as i64;
        let ca = Ca::generate_with(
            "ca",
            Validity {
                not_before: now - 100,
                not_after: now + 1_000,
            },
        )
        .expect("ca");
        let future = Ca::generate_with(
            "future",
            Validity {
                not_before: now + 500,
                not_after: now + 5_000,
            },
        )
        .expect("future");
        let expired = Ca::generate_with(
            "expired",
            Validity {
                not_before: now - 5_000,
                not_after: now - 50,
            },
        )
        .expect("expired");
        let ders: Vec<_> = [&ca, &future, &expired]
            .iter()
            .flat_map(|c| parse_cert_bundle(c.cert_pem().as_bytes()).expect("pem"))
            .collect();
        let (from, until) = window(ders.iter().map(|c| c.as_ref()), now as u64).expect("window");
        // From just after `expired` ended (now - 49) to just before `future` starts (now + 499).
        assert_eq!((from as i64, until as i64), (now - 49, now + 499));
        assert_eq!(window(std::iter::once(&[1u8, 2, 3][..]), 0), None);
    }
}
