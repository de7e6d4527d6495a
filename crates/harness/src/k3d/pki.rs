//! Certificates of a k3d deployment, generated once into `target/k3d/pki` and reused, so a
//! redeploy keeps the agents' trust and the harness keeps its client certificate.
//!
//! The gateway CA signs the serving certificate (both listeners; its DNS names come from
//! `clusterGateway.tls.dnsNames`); the internal CA signs the controller's, the harness's and
//! the gateway replicas' (for each other) client certificates. The CA keys are not written: nothing re-issues from them.

use std::path::{Path, PathBuf};

use super::K3dError;
use crate::pki::TestCa;

/// Files of the deployment's PKI.
#[derive(Clone, Debug)]
pub struct K3dPki {
    /// Directory.
    pub dir: PathBuf,
}

/// Every file, in the order they are written.
pub const FILES: [&str; 11] = [
    "server-ca.crt",
    "server.crt",
    "server.key",
    "internal-ca.crt",
    "controller.crt",
    "controller.key",
    "harness.crt",
    "harness.key",
    "gateway-peer.crt",
    "gateway-peer.key",
    "dns-names.txt",
];

fn io(what: String) -> impl FnOnce(std::io::Error) -> K3dError {
    move |source| K3dError::Io { what, source }
}

impl K3dPki {
    /// Loads the PKI in `dir`, generating it when a file is missing or the DNS names changed.
    pub fn load_or_generate(dir: &Path, dns_names: &[&str]) -> Result<K3dPki, K3dError> {
        let pki = K3dPki {
            dir: dir.to_path_buf(),
        };
        let names = dns_names.join("\n");
        let current = FILES.iter().all(|f| dir.join(f).is_file())
            && std::fs::read_to_string(dir.join("dns-names.txt"))
                .ok()
                .as_deref()
                == Some(&names);
        if current {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let pki_err = |err: crate::pki::PkiError| K3dError::Pki(err.to_string());
        let server_ca = TestCa::generate("buildplane-k3d-gateway-ca").map_err(pki_err)?;
        let server = server_ca.issue_server(dns_names).map_err(pki_err)?;
        let internal_ca = TestCa::generate("buildplane-k3d-internal-ca").map_err(pki_err)?;
        let controller = internal_ca
            .issue_client("buildplane-controller")
            .map_err(pki_err)?;
        let harness = internal_ca
            .issue_client("buildplane-e2e-harness")
            .map_err(pki_err)?;
        let gateway_peer = internal_ca
            .issue_client("cluster-gateway-peer")
            .map_err(pki_err)?;
        let contents = [
            server_ca.cert_pem.as_str(),
            &server.cert,
            &server.key,
            &internal_ca.cert_pem,
            &controller.cert,
            &controller.key,
            &harness.cert,
            &harness.key,
            &gateway_peer.cert,
            &gateway_peer.key,
            &names,
        ];
        for (file, text) in FILES.iter().zip(contents) {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(pki)
    }

    /// Reads one file.
    pub fn read(&self, file: &str) -> Result<String, K3dError> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))
    }

    /// A rustls client configuration that trusts the gateway CA and presents the harness's
    /// client certificate (for the internal API).
    pub fn harness_tls(&self) -> Result<rustls::ClientConfig, K3dError> {
        let harness = crate::pki::Pem {
            cert: self.read("harness.crt")?,
            key: self.read("harness.key")?,
        };
        crate::pki::client_tls(&self.read("server-ca.crt")?, &harness)
            .map_err(|err| K3dError::Pki(format!("harness TLS configuration: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second call keeps the certificates; new DNS names regenerate them.
    #[test]
    fn reuses_certificates_until_the_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = K3dPki::load_or_generate(dir.path(), &["a.example"]).unwrap();
        let ca = first.read("server-ca.crt").unwrap();
        let again = K3dPki::load_or_generate(dir.path(), &["a.example"]).unwrap();
        assert_eq!(again.read("server-ca.crt").unwrap(), ca);
        again.harness_tls().unwrap();
        let renamed = K3dPki::load_or_generate(dir.path(), &["b.example"]).unwrap();
        assert_ne!(renamed.read("server-ca.crt").unwrap(), ca);
    }
}
