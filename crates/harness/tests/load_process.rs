//! The load generator: its schedule, its stop and its errors (`load::generate`), and the
//! `e2e-load` process run as the engine runs it (`load::in_process`): a job in, the outcomes
//! out, an early stop when stdin closes, and a clear error when it cannot run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use buildplane_harness::load::{self, CpuPriority, LoadCredentials, LoadJob, LoadPlan};
use buildplane_harness::pki::TestCa;

const PROGRAM: &str = env!("CARGO_BIN_EXE_e2e-load");

/// A plain HTTP server answering 200 after `delay`, counting requests.
async fn server(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, count)
}

fn plan(base: String, rate: f64, concurrency: u32, duration: Duration) -> LoadPlan {
    LoadPlan {
        base_url: base,
        paths: vec!["/a".into(), "/b".into()],
        rate,
        concurrency,
        duration: Some(duration),
        ok_statuses: vec![],
        new_connections: false,
    }
}

#[tokio::test]
async fn sends_at_the_rate_for_the_duration() {
    let (base, count) = server(Duration::ZERO).await;
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let outcomes = load::generate(
        &reqwest::Client::new(),
        &plan(base, 50.0, 4, Duration::from_secs(1)),
        stop,
    )
    .await
    .outcomes;
    assert_eq!(outcomes.len(), 50);
    assert_eq!(count.load(Ordering::SeqCst), 50);
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
    let last = outcomes.iter().map(|o| o.scheduled).fold(0.0, f64::max);
    assert!((last - 0.98).abs() < 1e-6, "{last}");
}

/// With every slot busy, the requests that wait count their wait: one slot, a 200 ms
/// server and 20 requests a second for 0.5 s, so the last of the 10 waits ~1.8 s.
/// (Counting from when it left, as before, every latency would read ~200 ms.)
#[tokio::test]
async fn a_late_request_counts_from_its_schedule() {
    let (base, _) = server(Duration::from_millis(200)).await;
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let outcomes = load::generate(
        &reqwest::Client::new(),
        &plan(base, 20.0, 1, Duration::from_millis(500)),
        stop,
    )
    .await
    .outcomes;
    assert_eq!(outcomes.len(), 10);
    let worst = outcomes.iter().map(|o| o.latency_ms).fold(0.0, f64::max);
    assert!(worst > 1500.0, "{outcomes:?}");
}

#[tokio::test]
async fn stop_ends_the_load_and_waits_for_requests_in_flight() {
    let (base, count) = server(Duration::from_millis(300)).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut plan = plan(base, 10.0, 4, Duration::from_secs(60));
    plan.duration = None;
    let load = tokio::spawn(async move {
        load::generate(&reqwest::Client::new(), &plan, stop)
            .await
            .outcomes
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop_tx.send(true).unwrap();
    let outcomes = tokio::time::timeout(Duration::from_secs(5), load)
        .await
        .expect("stopped")
        .unwrap();
    assert_eq!(outcomes.len(), count.load(Ordering::SeqCst));
    assert!((2..=4).contains(&outcomes.len()), "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
}

#[tokio::test]
async fn failures_say_what_went_wrong() {
    let (base, _) = server(Duration::ZERO).await;
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let mut refused = plan(
        "http://127.0.0.1:1".into(),
        10.0,
        1,
        Duration::from_millis(100),
    );
    refused.paths.truncate(1);
    let outcomes = load::generate(&reqwest::Client::new(), &refused, stop.clone())
        .await
        .outcomes;
    let error = outcomes[0].error.as_deref().unwrap();
    assert!(error.contains("refused"), "{error}");
    let mut wrong_status = plan(base, 10.0, 1, Duration::from_millis(100));
    wrong_status.ok_statuses = vec![204];
    let outcomes = load::generate(&reqwest::Client::new(), &wrong_status, stop)
        .await
        .outcomes;
    assert_eq!(outcomes[0].error.as_deref(), Some("status 200"));
}

fn job(base: String, duration: Option<Duration>) -> LoadJob {
    let ca = TestCa::generate("load-test-ca").unwrap();
    let client = ca.issue_client("load-test").unwrap();
    let mut plan = plan(base, 40.0, 4, Duration::ZERO);
    plan.duration = duration;
    LoadJob {
        plan,
        credentials: LoadCredentials {
            server_ca: ca.cert_pem.clone(),
            cert: client.cert,
            key: client.key,
        },
    }
}

#[tokio::test]
async fn the_process_runs_the_job_and_reports_every_request() {
    let (base, count) = server(Duration::ZERO).await;
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let job = job(base, Some(Duration::from_millis(500)));
    let outcomes = load::in_process(PROGRAM.as_ref(), &job, CpuPriority::Normal, stop)
        .await
        .unwrap()
        .outcomes;
    assert_eq!(outcomes.len(), 20);
    assert_eq!(count.load(Ordering::SeqCst), 20);
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
}

#[tokio::test]
async fn stop_closes_stdin_and_the_process_reports_what_it_sent() {
    let (base, count) = server(Duration::from_millis(50)).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let job = job(base, None);
    let run = tokio::spawn(async move {
        load::in_process(PROGRAM.as_ref(), &job, CpuPriority::Normal, stop).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop_tx.send(true).unwrap();
    let outcomes = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the process stops")
        .unwrap()
        .unwrap()
        .outcomes;
    assert!(!outcomes.is_empty());
    assert_eq!(outcomes.len(), count.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_job_it_cannot_run_is_a_clear_error() {
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let mut job = job(
        "http://127.0.0.1:1".into(),
        Some(Duration::from_millis(100)),
    );
    job.credentials.key = "not a key".into();
    let err = load::in_process(PROGRAM.as_ref(), &job, CpuPriority::Normal, stop)
        .await
        .unwrap_err();
    assert!(err.contains("the load's client"), "{err}");
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let err = load::in_process(
        "/nonexistent/e2e-load".as_ref(),
        &job,
        CpuPriority::Normal,
        stop,
    )
    .await
    .unwrap_err();
    assert!(err.contains("starting /nonexistent/e2e-load"), "{err}");
}

/// The niceness a program started by `in_process` at `priority` runs at: the program is a
/// script that says it on stderr and fails, so that `in_process` returns it in its error.
async fn niceness_of_a_load_at(priority: CpuPriority) -> u8 {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("e2e-load");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"niceness=$(nice)\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let job = job(
        "http://127.0.0.1:1".into(),
        Some(Duration::from_millis(100)),
    );
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let err = load::in_process(&script, &job, priority, stop)
        .await
        .unwrap_err();
    let said = err.split("niceness=").nth(1).expect(&err);
    said.trim().parse().expect(&err)
}

#[tokio::test]
async fn a_load_at_the_lowest_priority_runs_at_nice_19() {
    let ours = std::process::Command::new("nice").output().unwrap().stdout;
    let ours: u8 = String::from_utf8_lossy(&ours).trim().parse().unwrap();
    assert_eq!(niceness_of_a_load_at(CpuPriority::Normal).await, ours);
    assert_eq!(niceness_of_a_load_at(CpuPriority::Lowest).await, 19);
}

#[test]
fn the_job_is_one_json_line() {
    let job = LoadJob {
        plan: plan("https://x".into(), 1.0, 1, Duration::from_secs(1)),
        credentials: LoadCredentials {
            server_ca: "ca\nline".into(),
            cert: "c".into(),
            key: "k".into(),
        },
    };
    let line = serde_json::to_string(&job).unwrap();
    assert!(!line.contains('\n'));
    let back: LoadJob = serde_json::from_str(&line).unwrap();
    assert_eq!(back.plan.paths, job.plan.paths);
}
