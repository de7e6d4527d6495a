//! Resolution and checks of a plane's `clientCA`: the Secret exists, the key exists, the PEM
//! holds at least one certificate, and none has expired or is about to.

use std::time::Duration;

use buildplane_api::names::reason;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use x509_parser::pem::Pem;

/// How long before expiry a CA is reported as `CAExpiresSoon`.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The outcome of resolving and checking a `clientCA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCheck {
    /// Whether the gateway can use the CA (true also for `CAExpiresSoon`).
    pub usable: bool,
    /// The condition reason (`Resolved`, `SecretNotFound`, ...).
    pub reason: &'static str,
    /// A message a person understands.
    pub message: String,
}

impl CaCheck {
    fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            usable: false,
            reason,
            message: message.into(),
        }
    }
}

/// Where the PEM came from, for messages.
#[derive(Debug, Clone, Copy)]
pub enum CaSource<'a> {
    /// `clientCA.value`.
    Inline,
    /// `clientCA.secretRef` naming `namespace/name` and `key`.
    Secret {
        namespace: &'a str,
        name: &'a str,
        key: &'a str,
    },
}

/// Resolves a `secretRef`: `secret` is the looked-up Secret, if it exists.
pub fn from_secret(
    secret: Option<&Secret>,
    namespace: Option<&str>,
    name: &str,
    key: &str,
    now_unix: i64,
) -> CaCheck {
    let Some(namespace) = namespace else {
        return CaCheck::failed(
            reason::INVALID_SPEC,
            format!("secretRef {name:?} has no namespace; a ClusterBuildPlane must name one"),
        );
    };
    let Some(secret) = secret else {
        return CaCheck::failed(
            reason::SECRET_NOT_FOUND,
            format!("Secret {namespace}/{name} referenced by clientCA.secretRef was not found"),
        );
    };
    let data = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key).cloned())
        .or_else(|| {
            secret.string_data.as_ref().and_then(|data| {
                data.get(key)
                    .map(|value| ByteString(value.as_bytes().to_vec()))
            })
        });
    let Some(ByteString(bytes)) = data else {
        return CaCheck::failed(
            reason::KEY_NOT_FOUND,
            format!("Secret {namespace}/{name} has no key {key:?}"),
        );
    };
    check_pem(
        &bytes,
        CaSource::Secret {
            namespace,
            name,
            key,
        },
        now_unix,
    )
}

/// Checks a PEM bundle: at least one certificate, none expired, none expiring soon.
pub fn check_pem(pem: &[u8], source: CaSource<'_>, now_unix: i64) -> CaCheck {
    let origin = match source {
        CaSource::Inline => "clientCA.value".to_owned(),
        CaSource::Secret {
            namespace,
            name,
            key,
        } => format!("Secret {namespace}/{name} key {key:?}"),
    };
    let mut n_certs = 0usize;
    let mut earliest_expiry: Option<(i64, String)> = None;
    let mut n_expired = 0usize;
    for pem_block in Pem::iter_from_buffer(pem) {
        let pem_block = match pem_block {
            Ok(block) => block,
            Err(err) => {
                return CaCheck::failed(
                    reason::INVALID_PEM,
                    format!("{origin}: not valid PEM: {err}"),
                );
            }
        };
        if pem_block.label != "CERTIFICATE" {
            continue;
        }
        let cert = match pem_block.parse_x509() {
            Ok(cert) => cert,
            Err(err) => {
                return CaCheck::failed(
                    reason::INVALID_PEM,
                    format!(
                        "{origin}: certificate {} does not parse: {err}",
                        n_certs + 1
                    ),
                );
            }
        };
        n_certs += 1;
        let not_after = cert.validity().not_after.timestamp();
        if not_after <= now_unix {
            n_expired += 1;
        }
        let subject = cert.subject().to_string();
        if earliest_expiry.as_ref().is_none_or(|(t, _)| not_after < *t) && not_after > now_unix {
            earliest_expiry = Some((not_after, subject));
        }
    }
    if n_certs == 0 {
        return CaCheck::failed(
            reason::INVALID_PEM,
            format!("{origin}: no PEM CERTIFICATE block found"),
        );
    }
    if n_expired == n_certs {
        return CaCheck::failed(
            reason::CA_EXPIRED,
            format!("{origin}: every certificate of the bundle has expired ({n_certs} in total)"),
        );
    }
    let warn_before = EXPIRY_WARNING.as_secs() as i64;
    if let Some((not_after, subject)) = earliest_expiry
        && not_after - now_unix < warn_before
    {
        let days = (not_after - now_unix) / 86_400;
        return CaCheck {
            usable: true,
            reason: reason::CA_EXPIRES_SOON,
            message: format!("{origin}: certificate {subject:?} expires in {days} day(s)"),
        };
    }
    let expired_note = if n_expired > 0 {
        format!(", {n_expired} expired")
    } else {
        String::new()
    };
    CaCheck {
        usable: true,
        reason: reason::RESOLVED,
        message: format!("{origin}: {n_certs} certificate(s){expired_note}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use rcgen::{CertificateParams, IsCa, KeyPair, date_time_ymd};

    use super::*;

    const NOW: i64 = 1_800_000_000; // 2027-01-15

    fn ca_pem(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").pem()
    }

    fn secret(key: &str, value: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("ca".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        }
    }

    /// One case per condition reason: what the CA is, and what the check must say.
    #[test]
    fn ca_check_table() {
        let valid = ca_pem((2026, 1, 1), (2036, 1, 1));
        let expired = ca_pem((2020, 1, 1), (2021, 1, 1));
        let expiring = ca_pem((2026, 1, 1), (2027, 1, 25));
        let rotated_bundle = format!("{expired}{valid}");
        let cases: Vec<(&str, Option<Secret>, &str, bool, &str)> = vec![
            ("valid inline CA", None, &valid, true, reason::RESOLVED),
            (
                "bundle of an expired and a valid CA",
                None,
                &rotated_bundle,
                true,
                reason::RESOLVED,
            ),
            ("expired CA", None, &expired, false, reason::CA_EXPIRED),
            (
                "CA expiring in 10 days",
                None,
                &expiring,
                true,
                reason::CA_EXPIRES_SOON,
            ),
            (
                "garbage",
                None,
                "not a certificate",
                false,
                reason::INVALID_PEM,
            ),
            ("empty", None, "", false, reason::INVALID_PEM),
            (
                "truncated PEM",
                None,
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                false,
                reason::INVALID_PEM,
            ),
        ];
        for (name, _, pem, usable, expected) in cases {
            let check = check_pem(pem.as_bytes(), CaSource::Inline, NOW);
            assert_eq!(check.reason, expected, "{name}: {}", check.message);
            assert_eq!(check.usable, usable, "{name}");
            assert!(
                check.message.starts_with("clientCA.value"),
                "{name}: {}",
                check.message
            );
        }
    }

    /// Secret references fail with the reason that names what is missing.
    #[test]
    fn secret_reference_failures_name_what_is_missing() {
        let valid = ca_pem((2026, 1, 1), (2036, 1, 1));
        let missing = from_secret(None, Some("org"), "ca", "ca.crt", NOW);
        assert_eq!(missing.reason, reason::SECRET_NOT_FOUND);
        assert!(missing.message.contains("org/ca"), "{}", missing.message);

        let wrong_key = from_secret(
            Some(&secret("tls.crt", &valid)),
            Some("org"),
            "ca",
            "ca.crt",
            NOW,
        );
        assert_eq!(wrong_key.reason, reason::KEY_NOT_FOUND);
        assert!(
            wrong_key.message.contains("\"ca.crt\""),
            "{}",
            wrong_key.message
        );

        let no_namespace = from_secret(Some(&secret("ca.crt", &valid)), None, "ca", "ca.crt", NOW);
        assert_eq!(no_namespace.reason, reason::INVALID_SPEC);

        let good = from_secret(
            Some(&secret("ca.crt", &valid)),
            Some("org"),
            "ca",
            "ca.crt",
            NOW,
        );
        assert_eq!(good.reason, reason::RESOLVED, "{}", good.message);
        assert!(good.usable);
    }
}
