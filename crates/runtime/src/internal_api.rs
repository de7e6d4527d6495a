//! The mTLS client of the gateway's internal API (the plane status, proxy, notify and event
//! routes), as the controller, the benches and the tests build it: trusts only the gateway's
//! serving CA (no system roots) and presents a client certificate of the internal CA.

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("internal API client: {0}")]
pub struct InternalClientError(String);

impl From<reqwest::Error> for InternalClientError {
    fn from(err: reqwest::Error) -> Self {
        Self(err.to_string())
    }
}

/// A `reqwest` client builder for the gateway's internal API: rustls, `server_ca_pem` as the
/// only roots, `identity_pem` (certificate chain, then key, PEM) as the client certificate.
/// Callers add their own timeouts and pool settings.
pub fn internal_api_client(
    server_ca_pem: &[u8],
    identity_pem: &[u8],
) -> Result<reqwest::ClientBuilder, InternalClientError> {
    let identity = reqwest::Identity::from_pem(identity_pem)?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .identity(identity);
    let roots = reqwest::Certificate::from_pem_bundle(server_ca_pem)?;
    if roots.is_empty() {
        return Err(InternalClientError(
            "no CERTIFICATE in the gateway CA".into(),
        ));
    }
    for root in roots {
        builder = builder.add_root_certificate(root);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let err = internal_api_client(b"", b"not pem").unwrap_err();
        assert!(err.to_string().starts_with("internal API client"), "{err}");
    }
}
