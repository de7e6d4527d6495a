//! Reconnect backoff: exponential with full jitter (`sleep = rand(0, min(cap, base * 2^n))`), so
//! agents that lost the gateway together do not come back in the same second.

use std::time::Duration;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First ceiling.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// A connection that lived this long resets the backoff.
    pub reset_after: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            reset_after: Duration::from_secs(10),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, uniformly random below the ceiling; the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// Back to the first ceiling.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Skips `steps` doublings (used after authentication failures: no tight retry, still
    /// jittered so refused agents do not return together).
    pub fn penalize(&mut self, steps: u32) {
        self.attempt = self.attempt.saturating_add(steps);
    }

    /// The delay before retrying after the gateway refused with `status`, honouring its
    /// `Retry-After` (plus jitter, so a storm does not return in step).
    pub fn after_refusal(&mut self, status: u16, retry_after: Option<Duration>) -> Duration {
        if matches!(status, 401 | 403) {
            self.penalize(2);
        }
        let delay = self.next_delay();
        match retry_after {
            Some(after) => after + delay.min(after),
            None => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays stay below a ceiling that doubles up to the cap, and are spread out.
    #[test]
    fn full_jitter_below_a_doubling_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let ceiling = backoff.ceiling();
                assert!(backoff.next_delay() <= ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(&ceilings[..7], [500, 1000, 2000, 4000, 8000, 16000, 30000]);
        assert_eq!(ceilings[9], 30_000);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
                b.next_delay()
            })
            .collect();
        let distinct: std::collections::BTreeSet<u128> =
            delays.iter().map(|d| d.as_millis() / 100).collect();
        assert!(
            distinct.len() > 40,
            "full jitter spreads reconnects: {} buckets",
            distinct.len()
        );
    }

    /// A 401 backs off harder than a network error (no tight retry on bad credentials), still
    /// jittered; a 429's Retry-After is a floor, with jitter on top so a refused storm spreads.
    #[test]
    fn refusals_back_off_harder_and_honour_retry_after() {
        let mut network = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut auth = network.clone();
        let _ = network.next_delay();
        let _ = auth.after_refusal(401, None);
        assert_eq!(network.ceiling(), Duration::from_secs(1));
        assert_eq!(
            auth.ceiling(),
            Duration::from_secs(4),
            "two extra doublings"
        );
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            let delay = b.after_refusal(429, Some(Duration::from_secs(5)));
            assert!(delay >= Duration::from_secs(5) && delay <= Duration::from_millis(5500));
        }
    }

    /// With paused time, a sequence of failed attempts waits no longer than the sum of the
    /// ceilings, and a reset brings the next wait back under the base.
    #[tokio::test(start_paused = true)]
    async fn waits_follow_the_ceilings_in_paused_time() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let start = tokio::time::Instant::now();
        let mut ceilings = Duration::ZERO;
        for _ in 0..6 {
            ceilings += backoff.ceiling();
            tokio::time::sleep(backoff.next_delay()).await;
        }
        assert!(start.elapsed() <= ceilings);
        assert_eq!(
            ceilings,
            Duration::from_millis(500 + 1000 + 2000 + 4000 + 4000 + 4000)
        );
        backoff.reset();
        let before = tokio::time::Instant::now();
        tokio::time::sleep(backoff.next_delay()).await;
        assert!(before.elapsed() <= Duration::from_millis(500));
    }
}
