//! Reconnect backoff: exponential with full jitter (`sleep = rand(0, min(cap, base * 2^n))`), so
//! agents that lost the gateway together do not come back in the same second.

use std::time::Duration;

use k8s_openapi::jiff::{Timestamp, fmt::rfc2822};

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
    /// Admitted connections in a row that ended before `reset_after` (a gateway that admits
    /// and drops the agent again and again): they keep counting after an admission.
    flaps: u32,
}

impl Backoff {
    /// A backoff from `base` to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            reset_after: Duration::from_secs(10),
            attempt: 0,
            flaps: 0,
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
        self.flaps = 0;
    }

    /// The gateway admitted a connection: the refusals and failed dials before it say nothing
    /// about the next dial (an agent refused while its BuildPlane did not exist yet, as in
    /// every registration, would otherwise keep a 30 s ceiling through its first connection's
    /// first 10 s); only the young connection ends before it still count.
    pub fn admitted(&mut self) {
        self.attempt = self.flaps;
    }

    /// The delay before dialling again after a connection that served for `lived` ended. A
    /// connection the gateway drained (a restart, a rebalance: an orderly goodbye, however
    /// short its life) or one that stayed up `reset_after` starts again from the first step;
    /// one that flapped keeps backing off.
    pub fn after_close(&mut self, lived: Duration, drained: bool) -> Duration {
        if drained || lived >= self.reset_after {
            self.reset();
        } else {
            self.flaps = self.flaps.saturating_add(1);
            self.attempt = self.attempt.max(self.flaps);
        }
        self.next_delay()
    }

    /// Skips `steps` doublings (used after authentication failures: no tight retry, still
    /// jittered so refused agents do not return together).
    pub fn penalize(&mut self, steps: u32) {
        self.attempt = self.attempt.saturating_add(steps);
    }

    /// The delay before retrying after the gateway refused with `status`, honouring its
    /// `Retry-After` (at most [`MAX_RETRY_AFTER`], plus jitter up to as much again, so a storm
    /// does not return in step; a zero `Retry-After` leaves the backoff alone).
    pub fn after_refusal(&mut self, status: u16, retry_after: Option<Duration>) -> Duration {
        if matches!(status, 401 | 403) {
            self.penalize(2);
        }
        let delay = self.next_delay();
        match retry_after.map(|after| after.min(MAX_RETRY_AFTER)) {
            Some(after) if !after.is_zero() => after.saturating_add(delay.min(after)),
            _ => delay,
        }
    }
}

/// The longest `Retry-After` honoured: a gateway (or anything in front of it) asking for more
/// gets this, so a bad header cannot park an agent for years.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Reads a `Retry-After` header: delay-seconds or an HTTP date (RFC 9110), clamped to
/// [`MAX_RETRY_AFTER`]; a date in the past is zero. Anything else is ignored (`None`).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, Timestamp::now())
}

fn parse_retry_after_at(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    let after = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time".
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let date = rfc2822::parse(value).ok()?.timestamp();
        Duration::try_from(now.duration_until(date)).unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection the gateway drained starts the next dial from the first step, however
    /// short it lived and however far the agent had backed off before; one that ended
    /// otherwise before `reset_after` keeps backing off, and one that lived that long starts
    /// again too.
    #[test]
    fn a_drained_connection_starts_the_backoff_again() {
        let backed_off = || {
            let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            b.penalize(6);
            b
        };
        let mut drained = backed_off();
        assert!(drained.after_close(Duration::from_secs(2), true) <= Duration::from_millis(500));
        assert_eq!(drained.ceiling(), Duration::from_secs(1));
        let mut flapping = backed_off();
        flapping.after_close(Duration::from_secs(2), false);
        assert_eq!(flapping.ceiling(), Duration::from_secs(30));
        let mut stayed_up = backed_off();
        stayed_up.after_close(Duration::from_secs(10), false);
        assert_eq!(stayed_up.ceiling(), Duration::from_secs(1));
    }

    /// An admission forgets the refusals before it (two 401s put the ceiling at its cap), not
    /// the connections that ended young: a gateway that admits and drops the agent again and
    /// again meets a ceiling that doubles each time.
    #[test]
    fn admission_forgets_refusals_not_flaps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        b.after_refusal(401, None);
        b.after_refusal(401, None);
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        b.admitted();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
        let mut ceilings = Vec::new();
        for _ in 0..4 {
            assert!(b.after_close(Duration::from_secs(2), false) <= b.ceiling());
            b.admitted();
            ceilings.push(b.ceiling().as_millis());
        }
        assert_eq!(ceilings, [1000, 2000, 4000, 8000]);
        b.after_close(Duration::from_secs(10), false);
        b.admitted();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

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

    /// A huge `Retry-After` (here `u64::MAX` seconds) neither panics the backoff arithmetic
    /// (`Duration` overflow) nor makes the agent sleep for years: it is clamped.
    #[test]
    fn huge_retry_after_is_clamped_without_overflow() {
        let after = parse_retry_after(&u64::MAX.to_string()).expect("a number");
        assert_eq!(after, MAX_RETRY_AFTER);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let delay = backoff.after_refusal(429, Some(after));
        assert!(
            delay >= MAX_RETRY_AFTER && delay <= MAX_RETRY_AFTER * 2,
            "{delay:?}"
        );
        let delay = backoff.after_refusal(429, Some(Duration::MAX));
        assert!(delay <= MAX_RETRY_AFTER * 2, "{delay:?}");
    }

    fn check_retry_after(value: &str, expected: Option<Duration>) {
        let now = "2025-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after_at(value, now), expected, "{value:?}");
    }

    /// Seconds and HTTP dates are read, clamped to [`MAX_RETRY_AFTER`]; a date in the past is
    /// zero; anything else is ignored.
    #[test]
    fn retry_after_forms() {
        let secs = Duration::from_secs;
        check_retry_after("5", Some(secs(5)));
        check_retry_after(" 0 ", Some(secs(0)));
        check_retry_after("300", Some(secs(300)));
        check_retry_after("301", Some(MAX_RETRY_AFTER));
        check_retry_after("99999999999999999999999999", Some(MAX_RETRY_AFTER));
        check_retry_after("Wed, 01 Jan 2025 00:00:42 GMT", Some(secs(42)));
        check_retry_after("Wed, 01 Jan 2025 01:00:00 GMT", Some(MAX_RETRY_AFTER));
        check_retry_after("Tue, 31 Dec 2024 23:00:00 GMT", Some(secs(0)));
        for ignored in [
            "",
            "-5",
            "1.5",
            "soon",
            "5s",
            "Wed, 32 Jan 2025 00:00:00 GMT",
        ] {
            check_retry_after(ignored, None);
        }
    }
}
