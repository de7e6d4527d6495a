//! Per-planeID request rates (`--plane-rate-limit`, `--plane-rate-burst`): one tenant's flood
//! is refused at the gateway (429 with `Retry-After`) before its body is read and before it
//! costs its agent, its build cluster's API server or the cores it shares with other tenants
//! anything. Every planeID gets its own token bucket; a planeID under its rate is never
//! refused because of another's.
//!
//! The limit is per replica: a request counts where it arrives, not again at the sibling it is
//! forwarded to, so with N replicas behind a balancer a planeID gets up to N times the rate.
//!
//! A request costs one token when it is admitted, and the response bytes the gateway relays
//! back cost more as they pass (`--plane-rate-request-bytes`, one token per 64 KiB by
//! default), as kube-apiserver's priority and fairness charges a LIST more seats: a list of
//! 600 KiB costs about ten requests, not one like a GET of 1 KiB, and a watch that streams a
//! lot pays for it. Bytes are charged after admission, so a bucket can fall below zero; the
//! debt is capped at one burst (a planeID waits at most two bursts' worth of time), and the
//! planeID's next request waits until the bucket is back to one token. Bytes of a request
//! forwarded to a sibling replica are not charged.
//!
//! Memory is bounded: a bucket that has refilled holds nothing a new bucket would not, so full
//! buckets are dropped when the table reaches its capacity; a planeID that finds the table full
//! of busy buckets is let through untracked rather than refused for others' traffic.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Buckets kept at most (planeIDs with traffic within a burst's refill time).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The rate each planeID may send requests at through one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneRate {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests that may arrive at once after a quiet spell.
    pub burst: NonZeroU32,
    /// Response bytes that cost one more token (`None`: a request costs one token whatever
    /// it returns).
    pub bytes_per_token: Option<NonZeroU32>,
}

/// Response bytes that cost one token unless `--plane-rate-request-bytes` says otherwise.
pub const DEFAULT_BYTES_PER_TOKEN: u32 = 64 * 1024;

/// A request over its planeID's rate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "planeID {plane_id:?} is over its limit of {per_second} requests per second at this gateway replica; retry in {} ms",
    retry_after.as_millis()
)]
pub struct Throttled {
    /// The planeID the caller named.
    pub plane_id: String,
    /// Its rate.
    pub per_second: u32,
    /// When its next request would be admitted.
    pub retry_after: Duration,
}

impl Throttled {
    /// `Retry-After` in whole seconds, at least 1 (the header has no fractions).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The token buckets of every planeID with recent traffic.
#[derive(Debug)]
pub struct PlaneRates {
    rate: PlaneRate,
    capacity: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl PlaneRates {
    /// Buckets for `rate`, at most `capacity` of them tracked at once.
    pub fn new(rate: PlaneRate, capacity: usize) -> PlaneRates {
        PlaneRates {
            rate,
            capacity: capacity.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Takes one request's token from `plane_id`'s bucket at `now`, or says when to retry.
    pub fn admit(&self, plane_id: &str, now: Instant) -> Result<(), Throttled> {
        let per_second = f64::from(self.rate.per_second.get());
        let burst = f64::from(self.rate.burst.get());
        let mut buckets = self.buckets.lock();
        if let Some(bucket) = buckets.get_mut(plane_id) {
            let refilled = self.refill(*bucket, now);
            bucket.at = now;
            if refilled >= 1.0 {
                bucket.tokens = refilled - 1.0;
                return Ok(());
            }
            bucket.tokens = refilled;
            return Err(Throttled {
                plane_id: plane_id.to_owned(),
                per_second: self.rate.per_second.get(),
                retry_after: Duration::from_secs_f64((1.0 - refilled) / per_second),
            });
        }
        if buckets.len() >= self.capacity {
            buckets.retain(|_, bucket| self.refill(*bucket, now) < burst);
            if buckets.len() >= self.capacity {
                return Ok(());
            }
        }
        buckets.insert(
            plane_id.to_owned(),
            Bucket {
                tokens: burst - 1.0,
                at: now,
            },
        );
        Ok(())
    }

    /// Whether response bytes cost tokens ([`PlaneRates::charge`] does something).
    pub fn charges_bytes(&self) -> bool {
        self.rate.bytes_per_token.is_some()
    }

    /// Charges `bytes` of a response relayed for `plane_id` at `now` to its bucket, which may
    /// fall below zero, by at most one burst. A planeID not tracked (the table was full when
    /// it was admitted) is not charged.
    pub fn charge(&self, plane_id: &str, bytes: usize, now: Instant) {
        let Some(unit) = self.rate.bytes_per_token else {
            return;
        };
        let cost = bytes as f64 / f64::from(unit.get());
        if let Some(bucket) = self.buckets.lock().get_mut(plane_id) {
            let refilled = self.refill(*bucket, now);
            bucket.tokens = (refilled - cost).max(-f64::from(self.rate.burst.get()));
            bucket.at = now;
        }
    }

    /// `bucket`'s tokens at `now`: what it held plus the rate since, at most a burst.
    fn refill(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * f64::from(self.rate.per_second.get()))
            .min(f64::from(self.rate.burst.get()))
    }

    /// PlaneIDs tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rates(per_second: u32, burst: u32) -> PlaneRates {
        rates_by_bytes(per_second, burst, 0)
    }

    /// `bytes_per_token` 0: bytes cost nothing.
    fn rates_by_bytes(per_second: u32, burst: u32, bytes_per_token: u32) -> PlaneRates {
        PlaneRates::new(
            PlaneRate {
                per_second: NonZeroU32::new(per_second).unwrap(),
                burst: NonZeroU32::new(burst).unwrap(),
                bytes_per_token: NonZeroU32::new(bytes_per_token),
            },
            DEFAULT_CAPACITY,
        )
    }

    /// A response's bytes cost tokens: after a 600 KiB list at 64 KiB a token the planeID owes
    /// about nine and a half, its next request waits until it has one again, and another
    /// planeID is untouched. (Before, the list cost one token like a 1 KiB GET.)
    #[test]
    fn large_responses_cost_more_than_one_request() {
        let by_bytes = rates_by_bytes(10, 5, 64 * 1024);
        let t0 = Instant::now();
        by_bytes.admit("noisy", t0).unwrap();
        by_bytes.charge("noisy", 600 * 1024, t0);
        let refused = by_bytes.admit("noisy", t0).expect_err("in debt");
        // 4 - 9.375 = -5 (the debt is capped at one burst): 6 tokens to go at 10 a second.
        assert!(
            (refused.retry_after.as_secs_f64() - 0.6).abs() < 1e-6,
            "{:?}",
            refused.retry_after
        );
        by_bytes.admit("quiet", t0).expect("its own bucket");
        by_bytes
            .admit("noisy", t0 + Duration::from_millis(550))
            .expect_err("not back to one token yet");
        by_bytes
            .admit("noisy", t0 + Duration::from_millis(650))
            .expect("paid off");
        // Without a byte unit, bytes are free.
        let free = rates(10, 1);
        free.admit("p", t0).unwrap();
        free.charge("p", 100 << 20, t0);
        free.admit("p", t0 + Duration::from_millis(100))
            .expect("bytes cost nothing");
        assert!(!free.charges_bytes());
    }

    /// A burst passes, the next request is told when to come back, and it is admitted then;
    /// another planeID is untouched by the first one's flood.
    #[test]
    fn a_burst_passes_then_the_rate_holds_per_plane() {
        let rates = rates(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            rates.admit("noisy", t0).expect("within the burst");
        }
        let refused = rates.admit("noisy", t0).expect_err("past the burst");
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        assert_eq!(refused.retry_after_secs(), 1);
        assert!(refused.to_string().contains("\"noisy\""), "{refused}");
        rates
            .admit("quiet", t0)
            .expect("another planeID has its own bucket");
        rates
            .admit("noisy", t0 + Duration::from_millis(100))
            .expect("one token refilled");
        rates
            .admit("noisy", t0 + Duration::from_millis(150))
            .expect_err("half a token is not a token");
    }

    /// A full table drops the buckets that have refilled (they are what a new one would be),
    /// and lets a planeID through untracked when every bucket is busy.
    #[test]
    fn the_table_is_bounded() {
        let rates = PlaneRates::new(
            PlaneRate {
                per_second: NonZeroU32::new(1).unwrap(),
                burst: NonZeroU32::new(1).unwrap(),
                bytes_per_token: None,
            },
            2,
        );
        let t0 = Instant::now();
        rates.admit("a", t0).unwrap();
        rates.admit("b", t0).unwrap();
        rates
            .admit("c", t0)
            .expect("untracked when the table is busy");
        assert_eq!(rates.tracked(), 2);
        rates.admit("a", t0).expect_err("a is still tracked");
        let later = t0 + Duration::from_secs(2);
        rates.admit("c", later).unwrap();
        assert_eq!(rates.tracked(), 1, "a and b refilled and were dropped");
    }

    proptest! {
        /// Whatever the arrival times, no planeID gets more than its burst plus its rate times
        /// the time elapsed, and a planeID's admissions do not depend on another's traffic or
        /// the bytes it is charged.
        #[test]
        fn admissions_never_exceed_the_bucket(
            per_second in 1u32..50,
            burst in 1u32..20,
            gaps in proptest::collection::vec((0u64..200, any::<bool>()), 1..300),
        ) {
            // Another planeID's large answers cost it, never `p`.
            let shared = rates_by_bytes(per_second, burst, 1024);
            let alone = rates_by_bytes(per_second, burst, 1024);
            let t0 = Instant::now();
            let mut now = t0;
            let (mut admitted, mut admitted_alone) = (0u64, 0u64);
            for (gap_ms, other) in gaps {
                now += Duration::from_millis(gap_ms);
                if other {
                    if shared.admit("other", now).is_ok() {
                        shared.charge("other", 1 << 20, now);
                    }
                    continue;
                }
                let in_shared = shared.admit("p", now).is_ok();
                let in_alone = alone.admit("p", now).is_ok();
                prop_assert_eq!(in_shared, in_alone);
                admitted += u64::from(in_shared);
                admitted_alone += u64::from(in_alone);
                let elapsed = now.duration_since(t0).as_secs_f64();
                let bound = f64::from(burst) + elapsed * f64::from(per_second);
                prop_assert!(admitted as f64 <= bound + 1e-9, "{admitted} > {bound}");
            }
            prop_assert_eq!(admitted, admitted_alone);
        }
    }
}
