//! Client certificates: kube-sim's client CA, the admin certificate it issues
//! (`CN=kubernetes-admin`, `O=system:masters`, as kubeadm's `admin.conf`), and the users of the
//! certificates clients present.
//!
//! As on kube-apiserver, a client certificate is asked for but not required, and one that does
//! not chain to the client CA does not fail the handshake: it authenticates nobody, and a bearer
//! token on the same request may still do. A trusted certificate names the user in its CN and the
//! groups in its O fields, and wins over a token.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use serde_json::{Value, json};

use crate::Error;

/// The `extra` key under which the real server records the credential (the certificate's
/// SHA-256).
pub const CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// The client CA's certificate and the admin's certificate and key.
pub(crate) struct ClientCa {
    pub(crate) ca_pem: String,
    pub(crate) admin_cert_pem: String,
    pub(crate) admin_key_pem: String,
}

const FILES: [&str; 3] = ["client-ca.crt", "admin.crt", "admin.key"];

fn tls(err: impl std::fmt::Display) -> Error {
    Error::Tls(err.to_string())
}

impl ClientCa {
    /// Reads the client CA and admin certificate from the data directory, or generates them
    /// (and writes them there; a directory of an older kube-sim gets them on its next start).
    pub(crate) fn load_or_generate(data_dir: Option<&Path>) -> Result<Self, Error> {
        if let Some(dir) = data_dir {
            let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
            if paths.iter().all(|p| p.exists()) {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|source| Error::Io {
                        context: format!("reading {}", p.display()),
                        source,
                    })
                };
                return Ok(Self {
                    ca_pem: read(&paths[0])?,
                    admin_cert_pem: read(&paths[1])?,
                    admin_key_pem: read(&paths[2])?,
                });
            }
        }
        let generated = Self::generate()?;
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                context: format!("creating {}", dir.display()),
                source,
            })?;
            for (file, text) in FILES.iter().zip([
                &generated.ca_pem,
                &generated.admin_cert_pem,
                &generated.admin_key_pem,
            ]) {
                std::fs::write(dir.join(file), text).map_err(|source| Error::Io {
                    context: format!("writing {file}"),
                    source,
                })?;
            }
        }
        Ok(generated)
    }

    fn generate() -> Result<Self, Error> {
        let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-sim client CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kubernetes-admin");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            admin_cert_pem: cert.pem(),
            admin_key_pem: key.serialize_pem(),
        })
    }

    /// A verifier of certificates chained to the client CA (client auth optional).
    pub(crate) fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.map_err(tls)?).map_err(tls)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(tls)
    }
}

/// Asks for a client certificate (naming the client CA, as the real server does), accepts any
/// (the key's possession is still proven), and leaves trust to [`user_of`] after the handshake.
#[derive(Debug)]
pub(crate) struct AnyClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl AnyClientCert {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self { inner }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// SHA-256 of a certificate, in lower-case hex.
fn sha256_hex(der: &[u8]) -> String {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    suite
        .tls13()
        .map(|suite| {
            suite
                .common
                .hash_provider
                .hash(der)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

/// The user a client certificate chain authenticates, as the real server's x509 authenticator
/// names it: `username` from the CN, `groups` from the O fields plus `system:authenticated`, and
/// the certificate's SHA-256 as credential id. `None` when the chain does not verify against
/// the client CA (expired, other issuer, not for client auth) or has no CN.
pub fn user_of(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'_>]) -> Option<Value> {
    let (leaf, intermediates) = chain.split_first()?;
    if let Err(err) = verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
        tracing::debug!(%err, "untrusted client certificate");
        return None;
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let username = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    if username.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_owned)
        .collect();
    groups.push("system:authenticated".into());
    Some(json!({
        "username": username,
        "groups": groups,
        "extra": {CREDENTIAL_ID: [format!("X509SHA256={}", sha256_hex(leaf.as_ref()))]},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("PEM")
    }

    /// The admin certificate names kubernetes-admin in system:masters; another CA's certificate
    /// and garbage name nobody.
    #[test]
    fn trusted_certificates_name_their_user() {
        let ca = ClientCa::generate().expect("generated");
        let verifier = ca.verifier().expect("verifier");
        let user = user_of(verifier.as_ref(), &chain(&ca.admin_cert_pem)).expect("trusted");
        assert_eq!(user["username"], "kubernetes-admin");
        assert_eq!(
            user["groups"],
            json!(["system:masters", "system:authenticated"])
        );
        let id = user["extra"][CREDENTIAL_ID][0].as_str().unwrap_or("");
        assert!(id.starts_with("X509SHA256=") && id.len() == 11 + 64, "{id}");
        let other = ClientCa::generate().expect("generated");
        assert!(user_of(verifier.as_ref(), &chain(&other.admin_cert_pem)).is_none());
        assert!(
            user_of(
                verifier.as_ref(),
                &[CertificateDer::from(vec![0x30, 0x03, 1])]
            )
            .is_none()
        );
        assert!(user_of(verifier.as_ref(), &[]).is_none());
    }
}
