//! The fault API (`/_sim/` over HTTPS and the library handle): injected errors with Retry-After,
//! latency, path prefixes, closing watches, and compaction that makes resumed watches get 410.

mod common;

use std::time::Duration;

use common::start_sim as start;
use futures::StreamExt;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams, WatchEvent, WatchParams},
};
use kube_sim::Faults;
use serde_json::{Value, json};

/// A client without kube-rs's default retries of 429/503/504, so every injected error shows.
async fn client_without_retries(server: &kube_sim::RunningServer) -> Client {
    let mut config = server.client_config().await.expect("config");
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

/// Sends one raw request; returns status, headers and the JSON body (or Null).
async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, http::HeaderMap, Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(
            body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
        ))
        .expect("request");
    let response = client.send(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Error faults answer a Status with the code, reason and Retry-After; the prefix limits them;
/// clearing them heals; a fraction fails about that fraction of requests.
/// (Fails if faults are ignored, leak past their prefix, or survive DELETE.)
#[tokio::test]
async fn injected_errors_follow_rate_code_and_prefix() {
    let server = start().await;
    let client = client_without_retries(&server).await;
    let (code, _, body) = raw(&client, "POST", "/_sim/faults", Some(json!({
        "errorRate": 1.0, "errorCode": 429, "retryAfterSeconds": 3, "pathPrefix": "/api/v1/namespaces/default/configmaps"
    }))).await;
    assert_eq!(code, 200, "{body}");
    let (code, headers, body) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/configmaps",
        None,
    )
    .await;
    assert_eq!(code, 429);
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("3")
    );
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "TooManyRequests");
    assert_eq!(body["details"]["retryAfterSeconds"], 3);
    let (code, _, _) = raw(&client, "GET", "/api/v1/namespaces", None).await;
    assert_eq!(code, 200, "other paths are unaffected");

    for (error_code, reason) in [(500, "InternalError"), (503, "ServiceUnavailable")] {
        server.faults().set(Faults {
            error_rate: 1.0,
            error_code,
            ..Faults::default()
        });
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        match api.list(&Default::default()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (error_code, reason));
            }
            other => panic!("expected a {error_code}, got {other:?}"),
        }
    }

    raw(
        &client,
        "POST",
        "/_sim/faults",
        Some(json!({"errorRate": 0.5, "errorCode": 503})),
    )
    .await;
    let mut failures = 0;
    for _ in 0..200 {
        let (code, _, _) = raw(&client, "GET", "/api/v1/namespaces", None).await;
        if code == 503 {
            failures += 1;
        }
    }
    assert!(
        (60..=140).contains(&failures),
        "{failures} of 200 failed at rate 0.5"
    );

    let (code, _, _) = raw(&client, "DELETE", "/_sim/faults", None).await;
    assert_eq!(code, 200);
    assert_eq!(server.faults().current(), Faults::default());
    let (code, _, _) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/configmaps",
        None,
    )
    .await;
    assert_eq!(code, 200, "healed");
    let (code, _, body) = raw(&client, "GET", "/_sim/healthz", None).await;
    assert_eq!((code, &body["ok"]), (200, &json!(true)));
    server.shutdown().await;
}

/// Latency faults delay answers by at least the configured time.
#[tokio::test]
async fn injected_latency_delays_requests() {
    let server = start().await;
    let client = server.client().await.expect("client");
    server.faults().set(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let started = tokio::time::Instant::now();
    let (code, _, _) = raw(&client, "GET", "/api/v1/namespaces", None).await;
    assert_eq!(code, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    server.faults().clear();
    server.shutdown().await;
}

/// `close-watches` ends open watch streams; `compact` makes a resume from an old version get an
/// ERROR event with 410 Expired.
#[tokio::test]
async fn close_watches_and_compaction_disturb_watchers() {
    let server = start().await;
    let client = server.client().await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("c".into()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await
        .expect("created");
    let old_rv = created.metadata.resource_version.clone().expect("rv");
    let mut stream = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch")
        .boxed();
    let (code, _, body) = raw(&client, "POST", "/_sim/close-watches", None).await;
    assert_eq!(code, 200);
    assert!(body["closed"].as_u64() >= Some(1), "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = stream.next().await {
            event.expect("event");
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch stream ended");

    // Resuming from the old version still works before compaction...
    let mut resumed = api
        .watch(&WatchParams::default().timeout(1), &old_rv)
        .await
        .expect("watch")
        .boxed();
    while let Some(event) = resumed.next().await {
        assert!(
            !matches!(event.expect("event"), WatchEvent::Error(_)),
            "not expired yet"
        );
    }
    // ...and gets 410 after it.
    let (code, _, _) = raw(&client, "POST", "/_sim/compact", None).await;
    assert_eq!(code, 200);
    let mut expired = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), expired.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // A fresh list returns a version that can be watched from.
    let list = api.list(&Default::default()).await.expect("list");
    let fresh_rv = list.metadata.resource_version.expect("rv");
    let mut fresh = api
        .watch(&WatchParams::default().timeout(1), &fresh_rv)
        .await
        .expect("watch")
        .boxed();
    while let Some(event) = fresh.next().await {
        assert!(
            !matches!(event.expect("event"), WatchEvent::Error(_)),
            "fresh version is valid"
        );
    }
    server.shutdown().await;
}

/// Requests without the token (API and admin alike) get a 401 Status.
#[tokio::test]
async fn requests_without_the_token_get_401() {
    let server = start().await;
    let mut config = server.client_config().await.expect("config");
    config.auth_info = Default::default();
    let anonymous = Client::try_from(config).expect("client");
    for path in ["/api/v1/namespaces", "/_sim/healthz", "/apis"] {
        let (code, _, body) = raw(&anonymous, "GET", path, None).await;
        assert_eq!(code, 401, "{path}");
        assert_eq!(
            (body["kind"].as_str(), body["reason"].as_str()),
            (Some("Status"), Some("Unauthorized"))
        );
    }
    server.shutdown().await;
}
