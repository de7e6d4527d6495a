//! The rathole harness: a figure through the real binary when it is there, "skipped" with the
//! reason when it is not, and an error (not a skip) when the binary is there but does not work.
//!
//! The binary is the one `cargo xtask bench` builds (`BUILDPLANE_RATHOLE`, else
//! `target/peers/rathole-*/release/rathole`). Without it the measuring test says "skipped" and
//! passes, unless `BUILDPLANE_REQUIRE_RATHOLE=1`.

use std::{path::PathBuf, time::Duration};

use buildplane_benches::{Backend, KIB, Peer, Pki, Rathole, load, rathole::RATHOLE_ENV};

/// With it set to 1, a missing rathole binary fails the measuring test instead of skipping it.
const REQUIRE_ENV: &str = "BUILDPLANE_REQUIRE_RATHOLE";

fn trace_init() {
    buildplane_benches::init();
}

/// The binary `cargo xtask bench` built, if any.
fn built_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(RATHOLE_ENV).filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`; xtask builds rathole under `<target dir>/peers`.
    let peers = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()?
        .join("peers");
    std::fs::read_dir(peers)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("rathole-"))
        .map(|entry| entry.path().join("release").join("rathole"))
        .find(|bin| bin.is_file())
}

/// A missing binary is a skip whose reason names the path, never a figure.
#[tokio::test]
async fn rathole_is_skipped_with_the_reason_when_its_binary_is_missing() {
    trace_init();
    let pki = Pki::generate().unwrap();
    let backend = Backend::start().await.unwrap();
    let missing = PathBuf::from("/nonexistent/rathole");
    match Rathole::start(&missing, &pki, backend.addr).await.unwrap() {
        Peer::Skipped(reason) => assert!(
            reason.contains("/nonexistent/rathole"),
            "the reason should name the path: {reason}"
        ),
        Peer::Running(_) => panic!("rathole ran from a path that does not exist"),
    }
}

/// A binary that is there but exits at once is an error with its status, not a skip.
#[tokio::test]
async fn rathole_that_exits_is_an_error_not_a_skip() {
    trace_init();
    let pki = Pki::generate().unwrap();
    let backend = Backend::start().await.unwrap();
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        Rathole::start(std::path::Path::new("/bin/false"), &pki, backend.addr),
    )
    .await
    .expect("Rathole::start did not return; likely deadlocked");
    match res {
        Err(err) => assert!(
            format!("{err:#}").contains("exited"),
            "the error should say the process exited: {err:#}"
        ),
        Ok(Peer::Skipped(reason)) => panic!("a failing binary was skipped: {reason}"),
        Ok(Peer::Running(_)) => panic!("/bin/false answered as rathole"),
    }
}

/// Through the real binary, 1 KiB and 64 KiB rounds at c8 return whole bodies and the closed-loop
/// rate is above zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rathole_measures_a_nonzero_rate_through_its_binary() {
    trace_init();
    let Some(bin) = built_binary() else {
        let require = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
        assert!(
            !require,
            "{REQUIRE_ENV}=1 but no rathole binary: set {RATHOLE_ENV} or run `cargo xtask bench --quick` first"
        );
        eprintln!(
            "skipped: no rathole binary ({RATHOLE_ENV} unset, none under target/peers); `cargo xtask bench --quick` builds it"
        );
        return;
    };
    let pki = Pki::generate().unwrap();
    let backend = Backend::start().await.unwrap();
    let rathole = match Rathole::start(&bin, &pki, backend.addr).await.unwrap() {
        Peer::Running(rathole) => rathole,
        Peer::Skipped(reason) => panic!("{} was skipped: {reason}", bin.display()),
    };
    let client = pki.http_client().unwrap();
    for size in [KIB, 64 * KIB] {
        let url = rathole.url(size);
        let n = load::round(&client, &url, 8, size).await.unwrap();
        assert_eq!(n, 8 * size);
    }
    let rate = load::peak_rate(&client, &rathole.url(KIB), 8, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(rate > 0.0, "rate through rathole: {rate}");
}
