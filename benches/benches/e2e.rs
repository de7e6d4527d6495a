//! End-to-end throughput over loopback TLS: the same HTTP/1.1 client fetching 1 KiB, 64 KiB and
//! 16 MiB responses at concurrency 1, 64 and 256 straight from the backend (`direct`), through
//! the raw TLS byte relay (`relay`), through the gateway and an agent (`v1`, `v2`), and through
//! rathole with its TLS transport (`rathole`, a peer a user could pick instead; skipped with the
//! reason when `BUILDPLANE_RATHOLE` names no binary, see `buildplane_benches::rathole`).
//! At 1 KiB and c64 also v2 through gateway replicas behind a round-robin balancer (callers to
//! the replicas' internal API and the agent to the replicas' agent listener both cross it):
//! one replica (`v2_lb1`, what the balancer alone costs) and three (`v2_lb3`, the agent holding
//! one connection to each), against `v2`, one gateway and no balancer.
//!
//! One iteration is one round of `concurrency` concurrent requests; throughput counts body bytes.
//! 16 MiB runs at concurrency 1 and 64 only (a round at 256 moves 4 GiB), and not over v1, whose
//! base64 JSON message for 16 MiB exceeds the 16 MiB WebSocket message limit.

use std::time::Duration;

use buildplane_benches::{Backend, KIB, MIB, Peer, Pki, Rathole, Relay, Replicas, Tunnel, round};
#[global_allocator]
static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

fn cases() -> Vec<(usize, usize)> {
    if buildplane_benches::quick() {
        vec![(KIB, 1), (KIB, 64), (64 * KIB, 64), (16 * MIB, 1)]
    } else {
        vec![
            (KIB, 1),
            (KIB, 64),
            (KIB, 256),
            (64 * KIB, 1),
            (64 * KIB, 64),
            (64 * KIB, 256),
            (16 * MIB, 1),
            (16 * MIB, 64),
        ]
    }
}

fn size_name(size: usize) -> String {
    if size >= MIB {
        format!("{}MiB", size / MIB)
    } else {
        format!("{}KiB", size / KIB)
    }
}

fn e2e(c: &mut Criterion) {
    buildplane_benches::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let pki = Pki::generate().expect("PKI");
    let (backend, relay, tunnel, replicas, rathole) = rt.block_on(async {
        let backend = Backend::start().await.expect("backend");
        let relay = Relay::start(&pki, backend.addr).await.expect("relay");
        let tunnel = Tunnel::start(&pki, &backend).await.expect("tunnel");
        let mut replicas = Vec::new();
        for n in [1, 3] {
            let set = Replicas::start(&pki, &backend, n)
                .await
                .unwrap_or_else(|err| panic!("{n} replicas: {err:#}"));
            replicas.push((format!("v2_lb{n}"), set));
        }
        // A binary that is there but does not work is a failure, not a skip.
        let rathole = match Rathole::from_env(&pki, backend.addr)
            .await
            .expect("rathole")
        {
            Peer::Running(rathole) => Some(rathole),
            Peer::Skipped(reason) => {
                eprintln!("rathole: skipped: {reason}");
                None
            }
        };
        (backend, relay, tunnel, replicas, rathole)
    });
    let client = pki.http_client().expect("HTTP client");
    let quick = buildplane_benches::quick();
    for (size, concurrency) in cases() {
        let bytes = (size * concurrency) as u64;
        let mut group = c.benchmark_group(format!("e2e_{}_c{concurrency}", size_name(size)));
        group.throughput(Throughput::Bytes(bytes));
        if bytes >= 64 * MIB as u64 {
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_millis(1))
                .measurement_time(Duration::from_secs(1));
        } else if quick {
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(200))
                .measurement_time(Duration::from_millis(300));
        } else {
            group
                .sample_size(20)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_millis(1500));
        }
        let mut paths = vec![("direct", backend.url(size)), ("relay", relay.url(size))];
        if size < 16 * MIB {
            paths.push(("v1", tunnel.url(1, size)));
        }
        paths.push(("v2", tunnel.url(2, size)));
        if (size, concurrency) == (KIB, 64) {
            for (name, set) in &replicas {
                paths.push((name.as_str(), set.url(size)));
            }
        }
        if let Some(rathole) = &rathole {
            paths.push(("rathole", rathole.url(size)));
        }
        for (name, url) in paths {
            group.bench_function(name, |b| {
                b.to_async(&rt).iter(|| async {
                    round(&client, &url, concurrency, size)
                        .await
                        .unwrap_or_else(|err| panic!("{name}: {err:#}"))
                })
            });
        }
        group.finish();
    }
    drop(tunnel);
    drop(replicas);
    drop(rathole);
}

criterion_group!(benches, e2e);
criterion_main!(benches);
