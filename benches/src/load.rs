//! Load generation: one request, a round of concurrent requests, closed-loop peak rate and
//! open-loop latency at a fixed rate.

use std::time::Duration;

use futures::future::try_join_all;
use tokio::time::Instant;

/// How long one request may take, body included, before it counts as failed. Far above any
/// answer that works (16 MiB at c64 takes seconds); it exists so that a path that loses a request
/// (rathole drops a caller whose data channel failed, and the caller waits for ever) fails it
/// instead of hanging the bench.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// GETs `url`, reads the body to the end and returns its length; an error past [`FETCH_TIMEOUT`].
pub async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<usize> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(client, url)).await {
        Ok(res) => res,
        Err(_) => anyhow::bail!(
            "{url}: no complete answer within {} s",
            FETCH_TIMEOUT.as_secs()
        ),
    }
}

async fn fetch_unbounded(client: &reqwest::Client, url: &str) -> anyhow::Result<usize> {
    let mut res = client.get(url).send().await?;
    let status = res.status();
    if status != reqwest::StatusCode::OK {
        let body = res.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        anyhow::bail!("{url} answered {status}: {body}");
    }
    let mut n = 0;
    while let Some(chunk) = res.chunk().await? {
        n += chunk.len();
    }
    Ok(n)
}

/// `concurrency` concurrent GETs of `url`, each expected to return `size` bytes; the total.
pub async fn round(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    size: usize,
) -> anyhow::Result<usize> {
    let sizes = try_join_all((0..concurrency).map(|_| fetch(client, url))).await?;
    anyhow::ensure!(
        sizes.iter().all(|n| *n == size),
        "{url}: short body (expected {size} bytes)"
    );
    Ok(sizes.iter().sum())
}

/// Requests per second of `concurrency` closed-loop workers over `duration`.
pub async fn peak_rate(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + duration;
    let counts = try_join_all((0..concurrency).map(|_| async {
        let mut n = 0u64;
        while Instant::now() < deadline {
            fetch(client, url).await?;
            n += 1;
        }
        anyhow::Ok(n)
    }))
    .await?;
    Ok(counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64())
}

/// Latency percentiles of open-loop runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    /// Requests started per second.
    pub rate: f64,
    /// Requests started.
    pub n: usize,
    /// Requests that failed (a non-200 answer or a broken connection). A path that cannot
    /// sustain the rate sheds load (the agent answers 503 past its queue limit); those requests
    /// count in the percentiles as slower than any success (never only the survivors are
    /// timed): with over 1 % failed, the p99 is infinite (`null` in the JSON).
    pub failed: usize,
    /// The first failure, for the report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Open-loop windows pooled into these figures.
    pub windows: usize,
}

/// What one or more open-loop windows of one path measured: every success's latency and the
/// failures. Windows of the same path pool by [`Samples::merge`], so a bench can interleave
/// the paths (A, B, A, B) and let the machine's drift fall on all of them alike.
#[derive(Debug, Default)]
pub struct Samples {
    rate: f64,
    n: usize,
    failed: usize,
    first_failure: Option<String>,
    latencies: Vec<Duration>,
    windows: usize,
}

impl Samples {
    /// Adds another window's samples.
    pub fn merge(&mut self, other: Samples) {
        self.rate = other.rate;
        self.n += other.n;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.latencies.extend(other.latencies);
        self.windows += other.windows;
    }

    /// The percentiles; an error when every request failed.
    pub fn summary(mut self) -> anyhow::Result<Latency> {
        anyhow::ensure!(
            !self.latencies.is_empty(),
            "all {} requests failed at {:.0}/s{}",
            self.n,
            self.rate,
            self.first_failure
                .as_deref()
                .map(|f| format!(" (first: {f})"))
                .unwrap_or_default()
        );
        self.latencies.sort();
        Ok(Latency {
            rate: self.rate,
            n: self.n,
            failed: self.failed,
            p50_ms: percentile(&self.latencies, self.failed, 0.50),
            p99_ms: percentile(&self.latencies, self.failed, 0.99),
            first_failure: self.first_failure,
            windows: self.windows,
        })
    }
}

/// Starts GETs of `url` at `rate` per second for `duration` (open loop: a slow answer does not
/// delay the next request) and measures each one from its scheduled start, so queueing counts.
/// At most `connections` requests are on the wire at once, as wrk2 keeps a fixed set of
/// connections: a request scheduled while all are busy waits for one, and its wait counts in
/// its latency. (An unbounded client turns any hiccup into hundreds of new mTLS handshakes;
/// on a 2-core machine that storm collapses even the raw TLS relay, so it measures the
/// machine's handshake rate, not the path.)
pub async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Samples> {
    let on_the_wire = std::sync::Arc::new(tokio::sync::Semaphore::new(connections.max(1)));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let n = ((duration.as_secs_f64() * rate) as usize).max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let client = client.clone();
        let url = url.to_owned();
        let on_the_wire = on_the_wire.clone();
        tasks.push(tokio::spawn(async move {
            let _connection = on_the_wire.acquire_owned().await?;
            fetch(&client, &url).await?;
            anyhow::Ok(scheduled.elapsed())
        }));
    }
    let mut samples = Samples {
        rate,
        n,
        latencies: Vec::with_capacity(n),
        windows: 1,
        ..Samples::default()
    };
    // BENCH_TIMELINE=1: successes, failures and the slowest request per 250 ms of schedule, on
    // stderr (how a collapse starts: at once, or after a spike).
    let timeline = std::env::var_os("BENCH_TIMELINE").is_some();
    let per_bucket = ((rate / 4.0) as usize).max(1);
    let mut bucket = (0usize, 0usize, Duration::ZERO);
    for (i, task) in tasks.into_iter().enumerate() {
        if timeline && i > 0 && i % per_bucket == 0 {
            eprintln!(
                "t={:>5.2}s ok={} failed={} max={:?}",
                i as f64 / rate,
                bucket.0,
                bucket.1,
                bucket.2
            );
            bucket = (0, 0, Duration::ZERO);
        }
        match task.await? {
            Ok(latency) => {
                bucket.0 += 1;
                bucket.2 = bucket.2.max(latency);
                samples.latencies.push(latency);
            }
            Err(err) => {
                bucket.1 += 1;
                samples.failed += 1;
                samples
                    .first_failure
                    .get_or_insert_with(|| format!("{url}: {err:#}"));
            }
        }
    }
    Ok(samples)
}

/// The `q` quantile in milliseconds of sorted successes plus `failed` requests that count as
/// slower than every success (infinite when the quantile falls among them).
fn percentile(sorted: &[Duration], failed: usize, q: f64) -> f64 {
    let n = sorted.len() + failed;
    let i = ((n as f64 * q).ceil() as usize).clamp(1, n.max(1)) - 1;
    sorted
        .get(i)
        .map_or(f64::INFINITY, |latency| latency.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failures are slower than every success: 2 of 100 failed puts the p99 among them.
    #[test]
    fn failures_count_in_the_percentiles() {
        let ms = |n: u64| Duration::from_millis(n);
        let ok: Vec<Duration> = (1..=98).map(ms).collect();
        assert_eq!(percentile(&ok, 2, 0.50), 50.0);
        assert!(percentile(&ok, 2, 0.99).is_infinite());
        let all: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&all, 0, 0.99), 99.0);
    }

    /// Pooled windows are one distribution: the p99 of two windows is not either window's.
    #[test]
    fn windows_pool_into_one_distribution() {
        let ms = |n: u64| Duration::from_millis(n);
        let window = |latencies: Vec<Duration>, failed: usize| Samples {
            rate: 100.0,
            n: latencies.len() + failed,
            failed,
            first_failure: (failed > 0).then(|| "503".to_owned()),
            latencies,
            windows: 1,
        };
        let mut pooled = window((1..=50).map(ms).collect(), 0);
        pooled.merge(window((51..=99).map(ms).collect(), 1));
        let latency = pooled.summary().unwrap();
        assert_eq!((latency.n, latency.failed, latency.windows), (100, 1, 2));
        assert_eq!(latency.p50_ms, 50.0);
        assert_eq!(latency.p99_ms, 99.0);
        assert_eq!(latency.first_failure.as_deref(), Some("503"));
        assert!(window(Vec::new(), 3).summary().is_err());
    }
}
