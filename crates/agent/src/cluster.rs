//! The build cluster's API server, as the agent reaches it: a kube-rs [`Client`] for the agent's
//! own objects (its identity Secrets) and a request path for the requests it runs on the
//! control plane's behalf.
//!
//! The request path is the same tower stack kube-rs builds from a [`kube::Config`] (base URI,
//! credentials with token refresh, impersonation and extra headers, rustls, connect and write
//! timeouts), without the `tower::Buffer` that [`Client`] puts in front of it: a proxied request
//! is sent from the task that reads its response instead of being handed to the Buffer's worker
//! task and back, two task wake-ups fewer per request (9% of the agent's time at 1 KiB c64 in the
//! profile in BENCHMARKS.md). The stack has no proxy support, so a configuration with a proxy is
//! refused, as [`Client`] itself refuses it in this build (kube-rs without `http-proxy`).

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use kube::Client;
use kube::client::ConfigExt as _;
use tower::{BoxError, ServiceBuilder, ServiceExt as _, util::BoxCloneSyncService};

/// A response body from the build cluster.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
/// A request body for the build cluster: streamed (a proxied body read under the tunnel's
/// credits) or whole.
pub type RequestBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// A whole request body.
pub fn whole(bytes: Bytes) -> RequestBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

type RequestService =
    BoxCloneSyncService<http::Request<RequestBody>, http::Response<ResponseBody>, BoxError>;

/// The build cluster's API server.
#[derive(Clone)]
pub struct BuildCluster {
    /// kube-rs client (identity Secrets, discovery).
    pub client: Client,
    requests: RequestService,
}

impl BuildCluster {
    /// The client and the request path for `config`.
    pub fn from_config(config: kube::Config) -> Result<Self, kube::Error> {
        // The client first: it refuses a proxy, which the request path would otherwise bypass.
        let client = Client::try_from(config.clone())?;
        Ok(Self {
            requests: request_service(&config)?,
            client,
        })
    }

    /// Sends one request (its URI is a path and query; the base URI and credentials are added).
    pub async fn send(
        &self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<ResponseBody>, BoxError> {
        self.requests.clone().oneshot(request).await
    }
}

/// kube-rs's default stack for `config`, minus the Buffer (and the tracing layer: the agent
/// logs each request itself).
fn request_service(config: &kube::Config) -> Result<RequestService, kube::Error> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let client: hyper_util::client::legacy::Client<_, RequestBody> =
        hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .map_response(|response: http::Response<hyper::body::Incoming>| {
            response.map(|body| body.map_err(BoxError::from).boxed_unsync())
        })
        .service(client);
    Ok(BoxCloneSyncService::new(service))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_sim::{Config, Server};

    async fn get(cluster: &BuildCluster, path: &str) -> (u16, serde_json::Value) {
        let request = http::Request::get(path).body(whole(Bytes::new())).unwrap();
        let response = cluster.send(request).await.expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, serde_json::from_slice(&body).expect("JSON"))
    }

    /// The direct path adds the base URI and the agent's token, as kube-rs's stack does: the
    /// same request without the token is refused.
    #[tokio::test]
    async fn direct_requests_reach_the_api_server_with_the_agents_credentials() {
        buildplane_pki::install_crypto_provider();
        let server = Server::start(Config::default()).await.expect("kube-sim");
        let config = server.client_config().await.expect("config");
        assert!(
            config.auth_info.token.is_some(),
            "kube-sim hands out a token"
        );

        let cluster = BuildCluster::from_config(config.clone()).expect("cluster");
        let (status, body) = get(&cluster, "/api/v1/namespaces").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["kind"], "NamespaceList");

        let mut anonymous = config;
        anonymous.auth_info.token = None;
        let cluster = BuildCluster::from_config(anonymous).expect("cluster");
        let (status, body) = get(&cluster, "/api/v1/namespaces").await;
        assert_eq!(status, 401, "{body}");
    }

    /// A configured proxy is never bypassed: it is kube-rs's business, and this build of kube-rs
    /// has no proxy support, so the agent refuses the configuration as kube-rs does.
    #[tokio::test]
    async fn a_proxy_is_not_bypassed() {
        buildplane_pki::install_crypto_provider();
        let mut config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        config.proxy_url = Some("http://127.0.0.1:2".parse().unwrap());
        let Err(err) = BuildCluster::from_config(config) else {
            panic!("a proxy is refused");
        };
        assert!(
            matches!(err, kube::Error::ProxyProtocolDisabled { .. }),
            "{err}"
        );
    }

    /// A connection refused is an error at once.
    #[tokio::test]
    async fn an_unreachable_api_server_is_an_error() {
        buildplane_pki::install_crypto_provider();
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let cluster = BuildCluster::from_config(config).unwrap();
        let request = http::Request::get("/api")
            .body(whole(Bytes::new()))
            .unwrap();
        assert!(cluster.send(request).await.is_err());
    }
}
