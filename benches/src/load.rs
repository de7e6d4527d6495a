//! Load generation: one request, a round of concurrent requests, closed-loop peak rate and
//! open-loop latency at a fixed rate.

use std::time::Duration;

use futures::future::try_join_all;
use tokio::time::Instant;

/// GETs `url`, reads the body to the end and returns its length.
pub async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<usize> {
    let mut res = client.get(url).send().await?;
    anyhow::ensure!(
        res.status() == reqwest::StatusCode::OK,
        "{url} answered {}",
        res.status()
    );
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

/// Latency percentiles of an open-loop run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    /// Requests started per second.
    pub rate: f64,
    /// Requests measured.
    pub n: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
}

/// Starts GETs of `url` at `rate` per second for `duration` (open loop: a slow answer does not
/// delay the next request) and measures each one from its scheduled start, so queueing counts.
pub async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Latency> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let n = ((duration.as_secs_f64() * rate) as usize).max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let client = client.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            fetch(&client, &url).await?;
            anyhow::Ok(scheduled.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    for task in tasks {
        latencies.push(task.await??);
    }
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    Ok(Latency {
        rate,
        n,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}
