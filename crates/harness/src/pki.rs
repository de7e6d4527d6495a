//! Test PKI for an environment: the gateway's server CA and certificate, and the internal CA
//! that signs the controller's, the harness's and the gateway replicas' (to forward to each
//! other) client certificates.
//!
//! The harness generates its own certificates with rcgen rather than with `buildplane-pki`, so
//! the system under test is checked against an independent implementation.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Errors while generating or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed.
    #[error("generating certificate `{what}`: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// Writing a PEM file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and key in PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    /// Certificate.
    pub cert: String,
    /// Private key (PKCS#8).
    pub key: String,
}

/// A CA that can issue leaves.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate in PEM.
    pub cert_pem: String,
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_string(),
        source,
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

impl TestCa {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<TestCa, PkiError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err(common_name))?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(gen_err(common_name))?;
        let cert = params.self_signed(&key).map_err(gen_err(common_name))?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Pem, PkiError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err(common_name))?;
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(gen_err(common_name))?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err(common_name))?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A server certificate for `localhost`, the given DNS names and 127.0.0.1.
    pub fn issue_server(&self, dns_names: &[&str]) -> Result<Pem, PkiError> {
        let mut sans = vec![SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]))];
        for dns in ["localhost"].iter().chain(dns_names) {
            let dns = (*dns).try_into().map_err(gen_err(dns))?;
            sans.push(SanType::DnsName(dns));
        }
        self.issue(
            dns_names.first().copied().unwrap_or("localhost"),
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    pub fn issue_client(&self, common_name: &str) -> Result<Pem, PkiError> {
        self.issue(common_name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The files an environment's components use.
#[derive(Clone, Debug)]
pub struct EnvPki {
    /// CA that signed the gateway's server certificates (agents and the controller trust it).
    pub server_ca: PathBuf,
    /// The gateway's server certificate and key (both listeners).
    pub server_cert: PathBuf,
    /// See `server_cert`.
    pub server_key: PathBuf,
    /// CA of the internal API's clients.
    pub internal_client_ca: PathBuf,
    /// The controller's client certificate.
    pub controller_cert: PathBuf,
    /// See `controller_cert`.
    pub controller_key: PathBuf,
    /// The gateway replicas' client certificate for each other's internal API (forwarding).
    pub gateway_peer_cert: PathBuf,
    /// See `gateway_peer_cert`.
    pub gateway_peer_key: PathBuf,
    /// The harness's client certificate and key (PEM, for its own HTTP client).
    pub harness: Pem,
    /// The server CA (PEM).
    pub server_ca_pem: String,
}

fn write(path: &Path, text: &str) -> Result<PathBuf, PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

impl EnvPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> Result<EnvPki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let server_ca = TestCa::generate("buildplane-e2e-server-ca")?;
        let server = server_ca.issue_server(&[
            "cluster-gateway",
            "cluster-gateway.openchoreo-control-plane.svc",
        ])?;
        let internal_ca = TestCa::generate("buildplane-e2e-internal-ca")?;
        let controller = internal_ca.issue_client("buildplane-controller")?;
        let harness = internal_ca.issue_client("buildplane-e2e-harness")?;
        let gateway_peer = internal_ca.issue_client("cluster-gateway-peer")?;
        Ok(EnvPki {
            server_ca: write(&dir.join("server-ca.crt"), &server_ca.cert_pem)?,
            server_cert: write(&dir.join("server.crt"), &server.cert)?,
            server_key: write(&dir.join("server.key"), &server.key)?,
            internal_client_ca: write(&dir.join("internal-ca.crt"), &internal_ca.cert_pem)?,
            controller_cert: write(&dir.join("controller.crt"), &controller.cert)?,
            controller_key: write(&dir.join("controller.key"), &controller.key)?,
            gateway_peer_cert: write(&dir.join("gateway-peer.crt"), &gateway_peer.cert)?,
            gateway_peer_key: write(&dir.join("gateway-peer.key"), &gateway_peer.key)?,
            server_ca_pem: server_ca.cert_pem,
            harness,
        })
    }

    /// A rustls client configuration that trusts the server CA and presents the harness's
    /// client certificate.
    pub fn harness_tls(&self) -> Result<rustls::ClientConfig, String> {
        client_tls(&self.server_ca_pem, &self.harness)
    }
}

/// A rustls client configuration that trusts `roots_pem` and presents `client`.
pub fn client_tls(roots_pem: &str, client: &Pem) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain = CertificateDer::pem_slice_iter(client.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated files exist and the harness's TLS configuration builds from them.
    #[test]
    fn generates_files_and_client_config() {
        let dir = tempfile::tempdir().unwrap();
        let pki = EnvPki::generate(dir.path()).unwrap();
        for path in [
            &pki.server_ca,
            &pki.server_cert,
            &pki.server_key,
            &pki.internal_client_ca,
            &pki.controller_cert,
            &pki.gateway_peer_cert,
        ] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN"), "{}", path.display());
        }
        pki.harness_tls().unwrap();
    }
}
