//! One real cluster's files and command lines: a CA, the API server's serving certificate, the
//! admin kubeconfig whose user authenticates with a client certificate (as kubeadm writes
//! `admin.conf`), the service-account key, and the flags of etcd, kube-apiserver and
//! kube-controller-manager. No kubelet and no nodes: a Pod stays Pending.
//!
//! Running the processes is left to the caller ([`crate::local`] for tests, the harness for
//! scenarios, which kills and restarts them).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::PeersError;

fn setup_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PeersError {
    let what = what.into();
    move |err| PeersError::Setup {
        what,
        reason: err.to_string(),
    }
}

/// A certificate and its key in PEM.
struct Pem {
    cert: String,
    key: String,
}

/// The cluster CA.
struct ClusterCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl ClusterCa {
    fn generate(common_name: &str) -> Result<ClusterCa, PeersError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(setup_err("CA"))?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(setup_err("CA key"))?;
        let cert = params.self_signed(&key).map_err(setup_err("CA"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    fn issue(
        &self,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Pem, PeersError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(setup_err("certificate"))?;
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(setup_err("key"))?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(setup_err("certificate"))?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// The API server's serving certificate: 127.0.0.1, localhost and the in-cluster names.
    fn issue_serving(&self) -> Result<Pem, PeersError> {
        let mut sans = vec![SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]))];
        for dns in [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            sans.push(SanType::DnsName(
                dns.try_into().map_err(setup_err("serving certificate"))?,
            ));
        }
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, "kube-apiserver");
        self.issue(subject, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate: CN is the user name, O the group, as Kubernetes reads them.
    fn issue_client(&self, user: &str, group: &str) -> Result<Pem, PeersError> {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, group);
        subject.push(DnType::CommonName, user);
        self.issue(subject, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The ports of one real cluster on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
pub struct ClusterPorts {
    /// etcd's client port.
    pub etcd_client: u16,
    /// etcd's peer port (a single-member cluster, but etcd binds it).
    pub etcd_peer: u16,
    /// kube-apiserver's secure port.
    pub apiserver: u16,
}

/// One real cluster's files and command lines.
#[derive(Clone, Debug)]
pub struct RealCluster {
    /// The cluster's name (also the kubeconfig context).
    pub name: String,
    /// Its ports.
    pub ports: ClusterPorts,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    dir: PathBuf,
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf, PeersError> {
    std::fs::write(&path, text).map_err(|err| PeersError::Setup {
        what: format!("writing {}", path.display()),
        reason: err.to_string(),
    })?;
    Ok(path)
}

/// The admin kubeconfig as kubeadm writes `admin.conf`: the CA and the client certificate
/// embedded, one cluster, one user, one context.
fn admin_kubeconfig(
    name: &str,
    server: &str,
    ca_pem: &str,
    client_cert: &str,
    client_key: &str,
) -> String {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let user = format!("kubernetes-admin@{name}");
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(client_cert),
            "client-key-data": b64(client_key),
        }}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
        "preferences": {},
    });
    serde_yaml::to_string(&value).unwrap_or_default()
}

impl RealCluster {
    /// Generates the cluster's CA, the API server's serving certificate, the admin client
    /// certificate (`O=system:masters`, as kubeadm's admin.conf had it before 1.29; a
    /// ClusterRoleBinding is not needed for that group), the service-account signing key, and
    /// the admin kubeconfig, into `dir`.
    pub fn prepare(dir: &Path, name: &str, ports: ClusterPorts) -> Result<RealCluster, PeersError> {
        std::fs::create_dir_all(dir).map_err(|err| PeersError::Setup {
            what: format!("creating {}", dir.display()),
            reason: err.to_string(),
        })?;
        let ca = ClusterCa::generate(&format!("kubernetes-ca-{name}"))?;
        let serving = ca.issue_serving()?;
        let admin = ca.issue_client("kubernetes-admin", "system:masters")?;
        let service_accounts = KeyPair::generate().map_err(setup_err("service-account key"))?;
        write(dir.join("ca.crt"), &ca.cert_pem)?;
        write(dir.join("ca.key"), &ca.key.serialize_pem())?;
        write(dir.join("apiserver.crt"), &serving.cert)?;
        write(dir.join("apiserver.key"), &serving.key)?;
        write(dir.join("sa.key"), &service_accounts.serialize_pem())?;
        write(dir.join("sa.pub"), &service_accounts.public_key_pem())?;
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        let kubeconfig = write(
            dir.join("admin.kubeconfig"),
            &admin_kubeconfig(name, &server, &ca.cert_pem, &admin.cert, &admin.key),
        )?;
        Ok(RealCluster {
            name: name.to_string(),
            ports,
            kubeconfig,
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The cluster CA (PEM file), which also signs the API server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// etcd: one member, data in the cluster's directory.
    pub fn etcd_args(&self) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer);
        [
            "--name",
            "default",
            "--data-dir",
            &self.file("etcd"),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("default={peer}"),
            "--log-level",
            "warn",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// kube-apiserver with the flags kubeadm sets that apply without nodes.
    ///
    /// `--endpoint-reconciler-type none`: the reconciler refuses a loopback advertise address,
    /// and tests bind 127.0.0.1 only, so the `default/kubernetes` Service has no endpoints.
    pub fn apiserver_args(&self) -> Vec<String> {
        [
            "--etcd-servers",
            &format!("http://127.0.0.1:{}", self.ports.etcd_client),
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            &self.ports.apiserver.to_string(),
            "--tls-cert-file",
            &self.file("apiserver.crt"),
            "--tls-private-key-file",
            &self.file("apiserver.key"),
            "--client-ca-file",
            &self.file("ca.crt"),
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            &self.file("sa.pub"),
            "--service-account-signing-key-file",
            &self.file("sa.key"),
            "--service-cluster-ip-range",
            "10.96.0.0/16",
            "--authorization-mode",
            "Node,RBAC",
            "--enable-admission-plugins",
            "NodeRestriction",
            "--allow-privileged=true",
            "--endpoint-reconciler-type",
            "none",
            "--profiling=false",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// kube-controller-manager with kubeadm's flags, minus its own serving port (not scraped
    /// here) and leader election (one replica). It uses the admin kubeconfig; kubeadm gives it
    /// its own client certificate, which changes nothing the scenarios see.
    pub fn controller_manager_args(&self) -> Vec<String> {
        [
            "--kubeconfig",
            &self.kubeconfig.display().to_string(),
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            "0",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            "--controllers",
            "*,bootstrapsigner,tokencleaner",
            "--service-account-private-key-file",
            &self.file("sa.key"),
            "--root-ca-file",
            &self.file("ca.crt"),
            "--cluster-signing-cert-file",
            &self.file("ca.crt"),
            "--cluster-signing-key-file",
            &self.file("ca.key"),
            "--profiling=false",
        ]
        .map(str::to_string)
        .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> ClusterPorts {
        ClusterPorts {
            etcd_client: 23790,
            etcd_peer: 23800,
            apiserver: 16443,
        }
    }

    /// The kubeconfig names the server and embeds a client certificate of group
    /// system:masters signed by the cluster CA, and every file the flags name exists.
    #[test]
    fn prepare_writes_a_kubeadm_style_admin_kubeconfig_and_the_files_the_flags_name() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = RealCluster::prepare(dir.path(), "control", ports()).unwrap();
        let text = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
        let config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(config["current-context"].as_str(), Some("control"));
        assert_eq!(
            config["clusters"][0]["cluster"]["server"].as_str(),
            Some("https://127.0.0.1:16443")
        );
        let cert = config["users"][0]["user"]["client-certificate-data"]
            .as_str()
            .unwrap();
        let cert = base64::engine::general_purpose::STANDARD
            .decode(cert)
            .unwrap();
        // The subject's O and CN are UTF8Strings in the DER (the real API server reading them
        // as group and user is what the apiserver backend's scenarios show).
        let pem = String::from_utf8(cert).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        for text in ["system:masters", "kubernetes-admin"] {
            assert!(
                der.windows(text.len()).any(|w| w == text.as_bytes()),
                "{text} is not in the client certificate"
            );
        }
        let args = [cluster.apiserver_args(), cluster.controller_manager_args()].concat();
        for (flag, value) in args.iter().zip(args.iter().skip(1)) {
            if flag.ends_with("-file") {
                assert!(Path::new(value).is_file(), "{flag} {value} is missing");
            }
        }
        assert!(
            cluster
                .etcd_args()
                .contains(&"default=http://127.0.0.1:23800".to_string())
        );
    }
}
