//! The `e2e-load` process, run as the engine runs it (`load::in_process`): a job in, the
//! outcomes out, an early stop when stdin closes, and a clear error when it cannot run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use buildplane_harness::load::{self, LoadCredentials, LoadJob, LoadPlan};
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

fn job(base: String, duration: Option<Duration>) -> LoadJob {
    let ca = TestCa::generate("load-test-ca").unwrap();
    let client = ca.issue_client("load-test").unwrap();
    LoadJob {
        plan: LoadPlan {
            base_url: base,
            paths: vec!["/x".into()],
            rate: 40.0,
            concurrency: 4,
            duration,
            ok_statuses: vec![],
            new_connections: false,
        },
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
    let outcomes = load::in_process(PROGRAM.as_ref(), &job, stop)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 20);
    assert_eq!(count.load(Ordering::SeqCst), 20);
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
}

#[tokio::test]
async fn stop_closes_stdin_and_the_process_reports_what_it_sent() {
    let (base, count) = server(Duration::from_millis(50)).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let job = job(base, None);
    let run = tokio::spawn(async move { load::in_process(PROGRAM.as_ref(), &job, stop).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop_tx.send(true).unwrap();
    let outcomes = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the process stops")
        .unwrap()
        .unwrap();
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
    let err = load::in_process(PROGRAM.as_ref(), &job, stop)
        .await
        .unwrap_err();
    assert!(err.contains("the load's client"), "{err}");
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let err = load::in_process("/nonexistent/e2e-load".as_ref(), &job, stop)
        .await
        .unwrap_err();
    assert!(err.contains("starting /nonexistent/e2e-load"), "{err}");
}
