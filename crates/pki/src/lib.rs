//! Identities and verification for the BuildPlane system: agent and gateway certificates
//! (rcgen), verification of an agent's chain against one BuildPlane's `clientCA` bundle
//! (rustls-webpki), and the rustls configurations of the agent listener, the internal mTLS API
//! and the agent's client, with certificates that can be swapped at runtime.
//!
//! # OpenChoreo's self-signed agent leaf
//! OpenChoreo's Helm chart issues the agent a self-signed, non-CA client certificate and pastes it
//! as its own `clientCA`. Go accepts it. webpki accepts it too: any certificate can be a trust
//! anchor (its subject and key are what count), and a self-signed leaf is then a one-element
//! path to itself. The row "self-signed non-CA leaf as its own clientCA" of the `chain_table`
//! test proves it (with rustls-webpki 0.103), so no byte-identity special case is needed; the
//! leaf's validity and EKU are still checked (`expired_self_signed_leaf_is_refused_even_when_pinned`).
//! Should a future webpki refuse such anchors, that row fails first.
//!
//! # The clientCA certificates' own constraints
//! webpki keeps only a trust anchor's subject, key and name constraints: it ignores the anchor's
//! validity and its basicConstraints pathLen. Go's and OpenSSL's verifiers check both, and so
//! does `verify_client`, on every path webpki builds: a leaf of an expired (or not yet valid)
//! CA gets `CaExpired` (`CaNotYetValid`), a chain with more intermediates below the CA than its
//! pathLen allows gets `PathLenExceeded`, and a fresh leaf signed with the key of an expired
//! pinned self-signed leaf gets `CaExpired` (`trust_anchor_constraints_table`). webpki itself
//! checks the validity and pathLen of the intermediates.
//!
//! # Trust at the agent listener
//! `agent_listener_config` requests a client certificate, accepts any chain, and still checks the
//! handshake signature with ring's algorithms, so a client holding only someone's certificate is
//! refused (`agent_listener_rejects_a_client_without_the_private_key`). The gateway decides trust
//! per BuildPlane after the handshake with `ClientCaBundle::verify_client`.

use std::{fmt, sync::Arc, time::Duration};

use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    DigitallySignedStruct, DistinguishedName as RustlsDn, SignatureScheme,
    client::ResolvesClientCert,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use thiserror::Error;

mod verdicts;
pub use verdicts::{DEFAULT_CAPACITY as DEFAULT_VERDICT_CAPACITY, VerdictCache, VerdictStats};

/// Failures generating, parsing or loading certificates.
#[derive(Debug, Error)]
pub enum Error {
    /// rcgen could not generate or sign.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The PEM held no certificate, or a malformed one.
    #[error("invalid certificate PEM: {0}")]
    InvalidPem(String),
    /// The PEM held no usable private key.
    #[error("invalid private key PEM: {0}")]
    InvalidKey(String),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A CA bundle for client verification could not be built.
    #[error("client CA bundle: {0}")]
    ClientCa(String),
}

/// `Result` with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The crypto provider of every process: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider; idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Leaf {
    /// The end of the certificate's validity, as Unix seconds.
    pub fn not_after(&self) -> Result<i64> {
        not_after(&self.cert_pem)
    }
}

/// The end of validity of the first certificate of a PEM, as Unix seconds.
pub fn not_after(cert_pem: &str) -> Result<i64> {
    let certs = parse_cert_bundle(cert_pem.as_bytes())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0])
        .map_err(|e| Error::InvalidPem(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Whether two certificates name the same subject (their distinguished names, byte for byte).
/// A certificate renewed under the same name (new key, new serial) keeps its subject; one that
/// does not parse names nothing.
pub fn same_subject(a: &CertificateDer<'_>, b: &CertificateDer<'_>) -> bool {
    let subject = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der)
            .ok()
            .map(|(_, cert)| cert.subject().as_raw().to_vec())
    };
    matches!((subject(a), subject(b)), (Some(a), Some(b)) if a == b)
}

/// Explicit validity, for renewals and for tests of expired or future certificates.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, Unix seconds.
    pub not_before: i64,
    /// End, Unix seconds.
    pub not_after: i64,
}

impl Validity {
    /// From one minute ago (clock skew) for `duration`.
    pub fn from_now(duration: Duration) -> Self {
        let now = unix_now();
        Self {
            not_before: now - 60,
            not_after: now + i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 2),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn to_offset(unix: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| Error::InvalidPem(format!("validity out of range: {e}")))
}

fn params(common_name: &str, validity: Validity) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "OpenChoreo");
    params.distinguished_name = name;
    params.not_before = to_offset(validity.not_before)?;
    params.not_after = to_offset(validity.not_after)?;
    Ok(params)
}

/// A certificate authority: the agent's own CA, the gateway's serving CA, or the internal CA.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between this CA and the root, leaf-side first (empty for a root).
    chain_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a self-signed ECDSA P-256 CA valid for `validity` from now.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Ca> {
        Self::generate_with(common_name, Validity::from_now(validity))
    }

    /// Generates a self-signed CA with explicit validity.
    pub fn generate_with(common_name: &str, validity: Validity) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = params(common_name, validity)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
            chain_pem: String::new(),
        })
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::InvalidKey(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| Error::InvalidPem(e.to_string()))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            chain_pem: String::new(),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The intermediates between this CA and its root, this CA first (PEM; empty for a root).
    /// Leaves it issues already carry it after their own certificate.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// Issues an intermediate CA signed by this one, valid for `validity` from now.
    pub fn issue_intermediate(&self, common_name: &str, validity: Duration) -> Result<Ca> {
        self.issue_intermediate_with(common_name, Validity::from_now(validity))
    }

    /// Issues an intermediate CA with explicit validity (expired intermediates in tests).
    pub fn issue_intermediate_with(&self, common_name: &str, validity: Validity) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = params(common_name, validity)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pem = key.serialize_pem();
        let chain_pem = format!("{}{}", cert.pem(), self.chain_pem);
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
            chain_pem,
        })
    }

    /// Issues a client certificate (client-auth EKU) valid for `validity` from now; its PEM
    /// carries the intermediates up to (not including) the root.
    pub fn issue_client(&self, common_name: &str, validity: Duration) -> Result<Leaf> {
        self.issue_client_with(
            common_name,
            Validity::from_now(validity),
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    /// Issues a client certificate with explicit validity and usages.
    pub fn issue_client_with(
        &self,
        common_name: &str,
        validity: Validity,
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = params(common_name, validity)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a server certificate (server-auth EKU) for DNS names and IP addresses.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ip_addrs: &[std::net::IpAddr],
        validity: Duration,
    ) -> Result<Leaf> {
        self.issue_server_with(dns_names, ip_addrs, Validity::from_now(validity))
    }

    /// Issues a server certificate with explicit validity.
    pub fn issue_server_with(
        &self,
        dns_names: &[&str],
        ip_addrs: &[std::net::IpAddr],
        validity: Validity,
    ) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = params(
            dns_names.first().copied().unwrap_or("cluster-gateway"),
            validity,
        )?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        for ip in ip_addrs {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Generates a self-signed, non-CA client certificate, as OpenChoreo's Helm chart does.
pub fn self_signed_client(common_name: &str, validity: Duration) -> Result<Leaf> {
    let key = KeyPair::generate()?;
    let mut params = params(common_name, Validity::from_now(validity))?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Parses every certificate of a PEM bundle; at least one is required.
pub fn parse_cert_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::InvalidPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(Error::InvalidPem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Parses the first private key of a PEM.
pub fn parse_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::InvalidKey(e.to_string()))
}

/// Why a presented client chain was not accepted by a CA bundle.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The bundle had no certificate.
    #[error("the clientCA bundle is empty")]
    EmptyBundle,
    /// No path from the certificate to a CA of the bundle.
    #[error("certificate signed by unknown authority")]
    UnknownIssuer,
    /// The certificate (or one in its chain) has expired.
    #[error("certificate has expired")]
    Expired,
    /// The certificate (or one in its chain) is not valid yet.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// The certificate is not for client authentication.
    #[error("certificate is not valid for client authentication")]
    WrongUsage,
    /// The clientCA certificate the chain leads to has expired (webpki does not check a trust
    /// anchor's own validity; Go and OpenSSL do, and so does `verify_client`).
    #[error("the CA {ca:?} of the clientCA bundle has expired")]
    CaExpired {
        /// The CA's subject common name (or whole subject).
        ca: String,
    },
    /// The clientCA certificate the chain leads to is not valid yet.
    #[error("the CA {ca:?} of the clientCA bundle is not yet valid")]
    CaNotYetValid {
        /// The CA's subject common name (or whole subject).
        ca: String,
    },
    /// The clientCA certificate's basicConstraints pathLen allows fewer intermediates below it
    /// than the chain has.
    #[error(
        "the CA {ca:?} of the clientCA bundle allows {path_len} intermediate(s) below it; the chain has {intermediates}"
    )]
    PathLenExceeded {
        /// The CA's subject common name (or whole subject).
        ca: String,
        /// Its pathLenConstraint.
        path_len: u32,
        /// Intermediates between it and the presented leaf.
        intermediates: usize,
    },
    /// A certificate (presented or in the bundle) is not valid DER or PEM.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The certificate could not be parsed, or another check failed.
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

impl From<webpki::Error> for VerifyError {
    fn from(err: webpki::Error) -> Self {
        match &err {
            webpki::Error::UnknownIssuer => Self::UnknownIssuer,
            webpki::Error::CertExpired { .. } => Self::Expired,
            webpki::Error::CertNotValidYet { .. } => Self::NotYetValid,
            webpki::Error::RequiredEkuNotFoundContext(_)
            | webpki::Error::EmptyEkuExtension
            | webpki::Error::CaUsedAsEndEntity => Self::WrongUsage,
            webpki::Error::BadDer
            | webpki::Error::BadDerTime
            | webpki::Error::TrailingData(_)
            | webpki::Error::UnsupportedCertVersion
            | webpki::Error::MalformedExtensions
            | webpki::Error::ExtensionValueInvalid
            | webpki::Error::InvalidCertValidity
            | webpki::Error::InvalidSerialNumber => Self::Malformed(format!("{err:?}")),
            _ => Self::Invalid(format!("{err:?}")),
        }
    }
}

/// A CA that verified a chain, by its public key (the DER SubjectPublicKeyInfo's contents, without
/// its SEQUENCE header, as webpki keeps a trust anchor): a CA re-issued with the same key is the
/// same CA. Connection caps per CA count by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CaId(Arc<[u8]>);

impl CaId {
    /// The id of the CA with this SubjectPublicKeyInfo contents.
    pub fn from_public_key(spki: &[u8]) -> Self {
        Self(spki.into())
    }

    /// The CA's SubjectPublicKeyInfo contents.
    pub fn public_key(&self) -> &[u8] {
        &self.0
    }
}

/// The CAs of one BuildPlane's `clientCA`, ready to verify agent chains.
#[derive(Debug, Clone)]
pub struct ClientCaBundle {
    certs: Vec<CertificateDer<'static>>,
    /// SHA-256 of the certificates, the bundle's part of a [`VerdictCache`] key.
    digest: [u8; 32],
}

impl ClientCaBundle {
    /// Parses a PEM bundle (several CAs during a rotation).
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        Ok(Self::from_ders(parse_cert_bundle(pem)?))
    }

    /// Parses a PEM bundle, giving the reason as a [`VerifyError`]: `EmptyBundle` when it holds
    /// no certificate, `Malformed` when a PEM block or a certificate in it is not valid.
    pub fn parse(pem: &[u8]) -> Result<Self, VerifyError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if certs.is_empty() {
            return Err(VerifyError::EmptyBundle);
        }
        for cert in &certs {
            webpki::anchor_from_trusted_cert(cert)
                .map_err(|e| VerifyError::Malformed(format!("clientCA certificate: {e:?}")))?;
        }
        Ok(Self::from_ders(certs))
    }

    /// A bundle of already parsed certificates; when empty, verification fails with
    /// [`VerifyError::EmptyBundle`].
    pub fn from_ders(certs: Vec<CertificateDer<'static>>) -> Self {
        let digest = verdicts::digest_ders(certs.iter().map(|c| c.as_ref()));
        Self { certs, digest }
    }

    /// SHA-256 over the bundle's certificates (each length-prefixed).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The certificates of the bundle.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The number of CAs.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle has no CA (never true for a parsed bundle).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Verifies an end-entity certificate and its intermediates for client authentication.
    pub fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), VerifyError> {
        self.verify_client_anchor(end_entity, intermediates, now)
            .map(drop)
    }

    /// Verifies like [`verify_client`](Self::verify_client) and tells which CA of the bundle the
    /// verified path ends in.
    pub fn verify_client_anchor(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CaId, VerifyError> {
        if self.certs.is_empty() {
            return Err(VerifyError::EmptyBundle);
        }
        let anchors: Vec<_> = self
            .certs
            .iter()
            .filter_map(|cert| webpki::anchor_from_trusted_cert(cert).ok())
            .collect();
        if anchors.is_empty() {
            return Err(VerifyError::Malformed(
                "no usable CA in the clientCA bundle".into(),
            ));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::from)?;
        // webpki keeps only a trust anchor's subject, key and name constraints: it checks
        // neither the anchor's validity nor its pathLen. Each candidate path is checked here
        // against the bundle certificate it ends in; a refusal makes webpki try the next path
        // (another anchor of a rotation bundle, another presented intermediate).
        let refusal = std::cell::RefCell::new(None::<VerifyError>);
        let check_anchor = |path: &webpki::VerifiedPath<'_>| {
            let n_intermediates = path.intermediate_certificates().count();
            let res = self.check_anchor(path.anchor(), n_intermediates, now);
            if let Err(err) = &res {
                refusal.borrow_mut().get_or_insert_with(|| err.clone());
            }
            res.map_err(|err| err.to_webpki(now))
        };
        let res = cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            Some(&check_anchor),
        );
        match res {
            Ok(path) => Ok(CaId(path.anchor().subject_public_key_info.as_ref().into())),
            Err(
                webpki::Error::CertExpired { .. }
                | webpki::Error::CertNotValidYet { .. }
                | webpki::Error::PathLenConstraintViolated,
            ) if let Some(refusal) = refusal.take() => Err(refusal),
            Err(err) => Err(VerifyError::from(err)),
        }
    }

    /// Checks what webpki leaves out for the bundle certificate(s) behind `anchor`: validity at
    /// `now`, and its pathLen against the intermediates below it (as Go's and OpenSSL's
    /// verifiers do). Several certificates can share the anchor's subject and key (a CA
    /// re-issued with the same key); one that passes is enough.
    fn check_anchor(
        &self,
        anchor: &rustls_pki_types::TrustAnchor<'_>,
        n_intermediates: usize,
        now: UnixTime,
    ) -> Result<(), VerifyError> {
        let mut first_refusal = None;
        for der in &self.certs {
            let Ok(candidate) = webpki::anchor_from_trusted_cert(der) else {
                continue;
            };
            if candidate.subject != anchor.subject
                || candidate.subject_public_key_info != anchor.subject_public_key_info
            {
                continue;
            }
            match anchor_limits(der, n_intermediates, now) {
                Ok(()) => return Ok(()),
                Err(err) => {
                    first_refusal.get_or_insert(err);
                }
            }
        }
        Err(first_refusal.unwrap_or_else(|| {
            VerifyError::Invalid("the trust anchor is not a certificate of the bundle".into())
        }))
    }
}

/// The validity and pathLen checks of one clientCA certificate used as the anchor of a path with
/// `n_intermediates` CAs below it.
fn anchor_limits(
    der: &CertificateDer<'_>,
    n_intermediates: usize,
    now: UnixTime,
) -> Result<(), VerifyError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| VerifyError::Malformed(format!("clientCA certificate: {e}")))?;
    let ca = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| cert.subject().to_string(), str::to_owned);
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(VerifyError::CaNotYetValid { ca });
    }
    if now > validity.not_after.timestamp() {
        return Err(VerifyError::CaExpired { ca });
    }
    let constraints = cert
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(format!("clientCA basicConstraints: {e}")))?;
    if let Some(path_len) = constraints.and_then(|ext| ext.value.path_len_constraint)
        && n_intermediates > path_len as usize
    {
        return Err(VerifyError::PathLenExceeded {
            ca,
            path_len,
            intermediates: n_intermediates,
        });
    }
    Ok(())
}

impl VerifyError {
    /// The webpki error standing for this refusal inside path building (where webpki ranks the
    /// errors of the paths it tried); `verify_client` gives the caller the refusal itself.
    fn to_webpki(&self, now: UnixTime) -> webpki::Error {
        match self {
            Self::CaExpired { .. } => webpki::Error::CertExpired {
                time: now,
                not_after: now,
            },
            Self::CaNotYetValid { .. } => webpki::Error::CertNotValidYet {
                time: now,
                not_before: now,
            },
            Self::PathLenExceeded { .. } => webpki::Error::PathLenConstraintViolated,
            _ => webpki::Error::UnknownIssuer,
        }
    }
}

/// A certificate and key that can be replaced while connections use them; the next handshake
/// sees the new one.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// Loads a chain (leaf first) and key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(chain_pem, key_pem)?),
        }))
    }

    /// Replaces the certificate for the next handshakes.
    pub fn replace_from_pem(&self, chain_pem: &str, key_pem: &str) -> Result<()> {
        *self.current.write() = certified_key(chain_pem, key_pem)?;
        Ok(())
    }

    /// The leaf in use.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.read().cert[0].clone()
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().clone()
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>> {
    let chain = parse_cert_bundle(chain_pem.as_bytes())?;
    let key = parse_private_key(key_pem.as_bytes())?;
    let signing_key = provider().key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    // A certificate and key from different files can be caught mid-update (tls.crt written,
    // tls.key not yet); presenting that pair would fail every handshake, so refuse to load it.
    // `Unknown` (a key type that cannot report its public key) is let through.
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(Error::InvalidKey(
            "the private key does not match the certificate".into(),
        ));
    }
    Ok(Arc::new(certified))
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for ReloadableCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Offers client authentication, accepts any chain, and checks proof of possession: the gateway
/// authorises the chain per BuildPlane after the handshake.
#[derive(Debug)]
struct AdmitAfterHandshake {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AdmitAfterHandshake {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[RustlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The agent listener: requests a client certificate, verifies possession, defers trust.
pub fn agent_listener_config(
    server_cert: Arc<ReloadableCert>,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let verifier = Arc::new(AdmitAfterHandshake {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(server_cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The internal API: requires a client certificate signed by `client_ca_pem`.
pub fn mtls_server_config(
    server_cert: Arc<ReloadableCert>,
    client_ca_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_cert_bundle(client_ca_pem)? {
        roots.add(cert)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::ClientCa(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(server_cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client trusting `server_ca_pem`, presenting `client_cert` when given.
pub fn client_config(
    server_ca_pem: &[u8],
    client_cert: Option<Arc<ReloadableCert>>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_cert_bundle(server_ca_pem)? {
        roots.add(cert)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
