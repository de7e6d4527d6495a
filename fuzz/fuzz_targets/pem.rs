//! PEM and certificate parsing: certificate bundles, private keys, the clientCA bundle (both
//! constructors), a certificate's validity and client-chain verification never panic, and the
//! bundle parsers agree with each other.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use buildplane_pki::{Ca, ClientCaBundle};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::UnixTime;

/// A real CA, so chains from the input are verified against a valid anchor too.
static CA: LazyLock<ClientCaBundle> = LazyLock::new(|| {
    let ca = Ca::generate("fuzz CA", Duration::from_secs(86_400)).expect("generating a CA");
    ClientCaBundle::from_pem(ca.cert_pem().as_bytes()).expect("its own certificate")
});

fuzz_target!(|data: &[u8]| {
    let bundle = buildplane_pki::parse_cert_bundle(data);
    if let Ok(certs) = &bundle {
        assert!(!certs.is_empty(), "a parsed bundle has a certificate");
    }
    let from_pem = ClientCaBundle::from_pem(data);
    assert_eq!(bundle.is_ok(), from_pem.is_ok());
    if let Ok(strict) = ClientCaBundle::parse(data) {
        // `parse` checks more than `from_pem`: whatever it accepts, `from_pem` accepts too.
        let loose = from_pem
            .as_ref()
            .expect("from_pem accepts what parse accepts");
        assert_eq!(strict.len(), loose.len());
        assert!(!strict.is_empty());
    }
    let _ = buildplane_pki::parse_private_key(data);

    if let Ok(text) = std::str::from_utf8(data) {
        let _ = buildplane_pki::not_after(text);
        // An operator's CA: certificate and key from the same PEM text.
        if text.contains("PRIVATE KEY") {
            let _ = Ca::from_pem(text, text);
        }
    }

    if let (Ok(certs), Ok(own)) = (&bundle, &from_pem) {
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000));
        let (end_entity, intermediates) = certs.split_first().expect("non-empty");
        let _ = CA.verify_client(end_entity, intermediates, now);
        let _ = own.verify_client(end_entity, intermediates, now);
    }
});
