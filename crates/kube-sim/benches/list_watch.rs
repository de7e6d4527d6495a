//! List and watch throughput of kube-sim with 10,000 objects, through kube-rs over HTTPS.
//!
//! `cargo bench -p kube-sim --bench list_watch`; figures in `BENCHMARKS-kube-sim.md`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams},
};

const OBJECTS: usize = 10_000;

fn config_map(i: usize) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("cm-{i:05}")),
            labels: Some([("bench".to_owned(), (i % 10).to_string())].into()),
            ..ObjectMeta::default()
        },
        data: Some([("payload".to_owned(), "x".repeat(200))].into()),
        ..ConfigMap::default()
    }
}

/// Creates `count` objects with 16 concurrent writers; returns the elapsed time.
async fn create_all(api: &Api<ConfigMap>, offset: usize, count: usize) -> Duration {
    let started = tokio::time::Instant::now();
    futures::stream::iter(offset..offset + count)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &config_map(i))
                    .await
                    .expect("created")
            }
        })
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
    started.elapsed()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (server, api) = rt.block_on(async {
        let server = kube_sim::Server::start(kube_sim::Config::default())
            .await
            .expect("server");
        let client = server.client().await.expect("client");
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let elapsed = create_all(&api, 0, OBJECTS).await;
        eprintln!(
            "created {OBJECTS} objects in {elapsed:?} ({:.0} creates/s, 16 concurrent writers)",
            OBJECTS as f64 / elapsed.as_secs_f64()
        );
        (server, api)
    });

    let mut group = c.benchmark_group("kube-sim 10k configmaps");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("list all 10,000", |b| {
        b.to_async(&rt).iter(|| async {
            let list = api.list(&ListParams::default()).await.expect("list");
            assert_eq!(list.items.len(), OBJECTS);
        })
    });
    group.bench_function("list 10,000 in pages of 500", |b| {
        b.to_async(&rt).iter(|| async {
            let mut params = ListParams::default().limit(500);
            let mut n = 0;
            loop {
                let page = api.list(&params).await.expect("page");
                n += page.items.len();
                match page.metadata.continue_ {
                    Some(token) if !token.is_empty() => params = params.continue_token(&token),
                    _ => break,
                }
            }
            assert_eq!(n, OBJECTS);
        })
    });
    group.bench_function("list by label selector (1,000 of 10,000)", |b| {
        b.to_async(&rt).iter(|| async {
            let list = api
                .list(&ListParams::default().labels("bench=3"))
                .await
                .expect("list");
            assert_eq!(list.items.len(), OBJECTS / 10);
        })
    });
    group.bench_function("watch from rv 0: 10,000 initial ADDED events", |b| {
        b.to_async(&rt).iter(|| async {
            let stream = api
                .watch(&WatchParams::default().timeout(60), "0")
                .await
                .expect("watch");
            let n = stream
                .take(OBJECTS)
                .try_fold(0usize, |n, event| async move {
                    Ok(n + usize::from(matches!(event, WatchEvent::Added(_))))
                })
                .await
                .expect("events");
            assert_eq!(n, OBJECTS);
        })
    });
    group.finish();

    // Live fan-out: 1,000 writes seen by 10 watchers at once (not a criterion loop: one run).
    rt.block_on(async {
        let rv = api
            .list(&ListParams::default().limit(1))
            .await
            .expect("list")
            .metadata
            .resource_version
            .expect("rv");
        let watchers: Vec<_> = (0..10)
            .map(|_| {
                let api = api.clone();
                let rv = rv.clone();
                tokio::spawn(async move {
                    let stream = api
                        .watch(&WatchParams::default().timeout(120), &rv)
                        .await
                        .expect("watch");
                    stream.take(1_000).count().await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = tokio::time::Instant::now();
        create_all(&api, OBJECTS, 1_000).await;
        for watcher in watchers {
            assert_eq!(watcher.await.expect("joined"), 1_000);
        }
        let elapsed = started.elapsed();
        eprintln!(
            "1,000 live writes delivered to 10 watchers in {elapsed:?} ({:.0} events/s delivered)",
            10_000.0 / elapsed.as_secs_f64()
        );
    });
    rt.block_on(server.shutdown());
}

criterion_group!(list_watch, benches);
criterion_main!(list_watch);
