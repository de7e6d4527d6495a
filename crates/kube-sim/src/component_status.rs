//! `v1` ComponentStatus (deprecated since 1.19, still served): computed on each request, as
//! kube-apiserver does, by probing the controller manager and the scheduler on their default
//! secure ports of 127.0.0.1 (`GET https://127.0.0.1:10257/healthz` and `:10259`, certificates not
//! verified) and reporting the storage (`etcd-0`: kube-sim's own store, always healthy). In a
//! kube-sim cluster nothing listens there, so both are `Unhealthy` with the dial error the real
//! server words, as on a real API server whose controller manager and scheduler run elsewhere.

use std::{sync::Arc, time::Duration};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The warning every request to the resource carries.
pub const WARNING: &str = "v1 ComponentStatus is deprecated in v1.19+";

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The components probed over HTTPS: name and port on 127.0.0.1.
const PROBED: &[(&str, u16)] = &[("controller-manager", 10257), ("scheduler", 10259)];

/// Accepts any server certificate (the real server's component probes skip verification too);
/// handshake signatures are still checked.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `(status, message)` of an HTTPS health probe, as Kubernetes' HTTP prober reports one:
/// `True` with the body for a 2xx/3xx answer, `False` with the status code otherwise, `False`
/// with the Go client's error when the request fails.
async fn probe(port: u16) -> (&'static str, String) {
    let address = format!("127.0.0.1:{port}");
    let url = format!("https://{address}/healthz");
    let failed = |error: String| ("False", format!("Get \"{url}\": {error}"));
    let tcp =
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&address)).await {
            Err(_) => return failed("context deadline exceeded".into()),
            Ok(Err(err)) => {
                let cause = match err.kind() {
                    std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                    _ => err.to_string(),
                };
                return failed(format!("dial tcp {address}: connect: {cause}"));
            }
            Ok(Ok(tcp)) => tcp,
        };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
            .with_no_client_auth(),
        Err(err) => return failed(err.to_string()),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let Ok(name) = ServerName::try_from("127.0.0.1") else {
        return failed("invalid server name".into());
    };
    let exchange = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(
            format!("GET /healthz HTTP/1.0\r\nHost: {address}\r\nUser-Agent: kube-probe\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        tls.take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Err(_) => return failed("context deadline exceeded".into()),
        Ok(Err(err)) => return failed(err.to_string()),
        Ok(Ok(answer)) => String::from_utf8_lossy(&answer).into_owned(),
    };
    let code: u16 = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    if (200..400).contains(&code) {
        ("True", body)
    } else {
        (
            "False",
            format!("HTTP probe failed with statuscode: {code}"),
        )
    }
}

fn component(name: &str, status: &str, message: &str) -> Value {
    json!({"kind": "ComponentStatus", "apiVersion": "v1", "metadata": {"name": name},
        "conditions": [{"type": "Healthy", "status": status, "message": message}]})
}

/// Every component's status (probed concurrently).
pub async fn all() -> Vec<Value> {
    let probes = PROBED.iter().map(|(name, port)| async move {
        let (status, message) = probe(*port).await;
        component(name, status, &message)
    });
    let mut items = futures::future::join_all(probes).await;
    items.push(component("etcd-0", "True", "ok"));
    items
}

/// One component's status, if it is one.
pub async fn one(name: &str) -> Option<Value> {
    match PROBED.iter().find(|(n, _)| *n == name) {
        Some((name, port)) => {
            let (status, message) = probe(*port).await;
            Some(component(name, status, &message))
        }
        None => (name == "etcd-0").then(|| component(name, "True", "ok")),
    }
}

/// The list as the real server answers it (items without kind and apiVersion).
pub fn list(items: Vec<Value>) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    json!({"kind": "ComponentStatusList", "apiVersion": "v1", "metadata": {}, "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component answering its health check over TLS (any certificate) is healthy with the
    /// body as message; another status code is unhealthy.
    #[tokio::test]
    async fn probes_read_the_health_answer() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
        )
        .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for answer in ["HTTP/1.0 200 OK\r\n\r\nok", "HTTP/1.0 500 Oops\r\n\r\nbad"] {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut tls = acceptor.accept(tcp).await.expect("handshake");
                let mut request = [0u8; 1024];
                let _ = tls.read(&mut request).await;
                tls.write_all(answer.as_bytes()).await.expect("write");
                tls.shutdown().await.expect("close");
            }
        });
        assert_eq!(probe(port).await, ("True", "ok".to_owned()));
        assert_eq!(
            probe(port).await,
            ("False", "HTTP probe failed with statuscode: 500".to_owned())
        );
    }
}
