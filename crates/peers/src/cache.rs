//! The peers cache (`$BUILDPLANE_PEERS_DIR`, else `$XDG_CACHE_HOME/buildplane/peers`, else
//! `~/.cache/buildplane/peers`), with one directory per module version
//! (`kubernetes-v1.37.2/kube-apiserver`), and the pins: Kubernetes once, OpenChoreo twice
//! (v1.0.0, the served version nearest v0.17.0, and the newest v1.x), each version in its own
//! directory (`openchoreo-v1.0.0/`, `openchoreo-v1.2.3/`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `peers/kubernetes/go.mod`: pins `k8s.io/kubernetes`.
pub const KUBERNETES_GO_MOD: &str = include_str!("../../../peers/kubernetes/go.mod");
/// `peers/openchoreo/go.mod`: pins `github.com/openchoreo/openchoreo`, the newest v1.x.
pub const OPENCHOREO_GO_MOD: &str = include_str!("../../../peers/openchoreo/go.mod");
/// `peers/openchoreo-v1.0/go.mod`: pins `github.com/openchoreo/openchoreo` v1.0.0, the version
/// the module proxy serves nearest to v0.17.0 (which it refuses).
pub const OPENCHOREO_V1_0_GO_MOD: &str = include_str!("../../../peers/openchoreo-v1.0/go.mod");

/// OpenChoreo's Go module.
pub const OPENCHOREO_MODULE: &str = "github.com/openchoreo/openchoreo";

/// Every OpenChoreo pin, oldest first: its directory under `peers/` and its go.mod.
pub const OPENCHOREO_PINS: [(&str, &str); 2] = [
    ("openchoreo-v1.0", OPENCHOREO_V1_0_GO_MOD),
    ("openchoreo", OPENCHOREO_GO_MOD),
];

/// The command that builds what is missing.
pub const BUILD_HINT: &str = "run `cargo xtask peers build`";

/// What is missing to run a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// No cache directory can be named.
    #[error("no peers cache directory: set BUILDPLANE_PEERS_DIR (or XDG_CACHE_HOME or HOME)")]
    NoCache,
    /// A go.mod in `peers/` pins no version of its module.
    #[error("peers/{0}/go.mod pins no version")]
    NoPin(&'static str),
    /// Programs are not built or installed.
    #[error("missing {}: {hint}", .programs.join(", "))]
    Missing {
        /// Each missing program with its path.
        programs: Vec<String>,
        /// What to run or install.
        hint: String,
    },
    /// Certificates or files could not be written.
    #[error("{what}: {reason}")]
    Setup {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A process exited or never became ready.
    #[error("{program} is not available: {reason}")]
    Unavailable {
        /// Which program.
        program: String,
        /// Why, with its log tail.
        reason: String,
    },
}

/// The peers cache directory, given the environment (`env` answers for a variable name).
/// Empty variables count as unset, and a relative XDG_CACHE_HOME is ignored (as the XDG base
/// directory spec says).
pub fn cache_root(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, PeersError> {
    let set = |key: &str| env(key).filter(|value| !value.is_empty());
    if let Some(dir) = set("BUILDPLANE_PEERS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|dir| Path::new(dir).is_absolute()) {
        return Ok(Path::new(&xdg).join("buildplane").join("peers"));
    }
    if let Some(home) = set("HOME") {
        return Ok(Path::new(&home).join(".cache/buildplane/peers"));
    }
    Err(PeersError::NoCache)
}

/// [`cache_root`] from this process's environment.
pub fn process_cache_root() -> Result<PathBuf, PeersError> {
    cache_root(&|key| std::env::var(key).ok())
}

/// The directory of one module version in the cache (`<prefix>-<version>`).
pub fn version_dir(root: &Path, cache_prefix: &str, version: &str) -> PathBuf {
    root.join(format!("{cache_prefix}-{version}"))
}

/// The version a go.mod requires `module` at (a `require` line, not a `replace`).
pub fn pinned_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let line = line.split("//").next().unwrap_or("").trim();
        if line.contains("=>") {
            return None;
        }
        let line = line.strip_prefix("require").map_or(line, str::trim_start);
        let mut words = line.split_whitespace();
        (words.next() == Some(module))
            .then(|| words.next())
            .flatten()
            .filter(|version| version.starts_with('v'))
            .map(str::to_string)
    })
}

/// etcd on `path` (a PATH value), else Debian's /usr/bin/etcd.
pub fn find_etcd(path: Option<&OsStr>) -> Option<PathBuf> {
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .chain(std::iter::once(PathBuf::from("/usr/bin/etcd")))
        .find(|candidate| candidate.is_file())
}

/// How to get etcd.
pub const ETCD_HINT: &str = "etcd not found: install Debian's etcd-server (`sudo apt-get install -y etcd-server`, binary /usr/bin/etcd) or put etcd on PATH";

/// The programs of a real cluster.
#[derive(Clone, Debug)]
pub struct ClusterPrograms {
    /// `etcd` (Debian's `etcd-server`).
    pub etcd: PathBuf,
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `kube-controller-manager`.
    pub kube_controller_manager: PathBuf,
}

impl ClusterPrograms {
    /// The pinned Kubernetes programs in the cache named by this process's environment, and
    /// etcd from PATH; fails naming what is missing and how to get it.
    pub fn locate() -> Result<ClusterPrograms, PeersError> {
        let version = pinned_version(KUBERNETES_GO_MOD, "k8s.io/kubernetes")
            .ok_or(PeersError::NoPin("kubernetes"))?;
        let dir = version_dir(&process_cache_root()?, "kubernetes", &version);
        let programs = ClusterPrograms {
            etcd: find_etcd(std::env::var_os("PATH").as_deref())
                .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd")),
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
        };
        programs.check()?;
        Ok(programs)
    }

    /// Each program with its name.
    pub fn all(&self) -> [(&'static str, &Path); 3] {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.kube_apiserver),
            ("kube-controller-manager", &self.kube_controller_manager),
        ]
    }

    /// Fails naming every program that is not a file, and how to get it.
    pub fn check(&self) -> Result<(), PeersError> {
        let programs: Vec<String> = self
            .all()
            .into_iter()
            .filter(|(_, path)| !path.is_file())
            .map(|(name, path)| format!("{name} ({})", path.display()))
            .collect();
        if programs.is_empty() {
            return Ok(());
        }
        let mut hint = BUILD_HINT.to_string();
        if !self.etcd.is_file() {
            hint.push_str(&format!("; {ETCD_HINT}"));
        }
        Err(PeersError::Missing { programs, hint })
    }
}

/// The pinned OpenChoreo versions, oldest first (`["v1.0.0", "v1.2.3"]`).
pub fn openchoreo_versions() -> Result<Vec<String>, PeersError> {
    OPENCHOREO_PINS
        .iter()
        .map(|(dir, go_mod)| {
            pinned_version(go_mod, OPENCHOREO_MODULE).ok_or(PeersError::NoPin(dir))
        })
        .collect()
}

/// The cache directory of OpenChoreo `version`'s programs (`cluster-gateway`, `cluster-agent`).
pub fn openchoreo_dir(version: &str) -> Result<PathBuf, PeersError> {
    Ok(version_dir(&process_cache_root()?, "openchoreo", version))
}

/// OpenChoreo's `program` (`cluster-gateway` or `cluster-agent`) at `version` (one of
/// [`openchoreo_versions`]), or an error naming `cargo xtask peers build` when it has not been
/// built.
pub fn openchoreo_program(version: &str, program: &str) -> Result<PathBuf, PeersError> {
    let path = openchoreo_dir(version)?.join(program);
    if path.is_file() {
        Ok(path)
    } else {
        Err(PeersError::Missing {
            programs: vec![format!("{program} {version} ({})", path.display())],
            hint: BUILD_HINT.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_cache_follows_the_variables_in_order() {
        let all = env(&[
            ("BUILDPLANE_PEERS_DIR", "/peers"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(cache_root(&all).unwrap(), PathBuf::from("/peers"));
        let xdg = env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]);
        assert_eq!(
            cache_root(&xdg).unwrap(),
            PathBuf::from("/xdg/buildplane/peers")
        );
        let home = env(&[("BUILDPLANE_PEERS_DIR", ""), ("HOME", "/home/u")]);
        assert_eq!(
            cache_root(&home).unwrap(),
            PathBuf::from("/home/u/.cache/buildplane/peers")
        );
        let odd = env(&[("XDG_CACHE_HOME", "relative"), ("HOME", "/home/u")]);
        assert_eq!(
            cache_root(&odd).unwrap(),
            PathBuf::from("/home/u/.cache/buildplane/peers")
        );
        assert!(cache_root(&env(&[])).is_err());
    }

    #[test]
    fn the_pins_are_read_from_the_committed_go_mod_files() {
        let kubernetes = pinned_version(KUBERNETES_GO_MOD, "k8s.io/kubernetes").unwrap();
        assert!(kubernetes.starts_with("v1.37."), "{kubernetes}");
        let openchoreo = openchoreo_versions().unwrap();
        assert_eq!(openchoreo.len(), 2, "{openchoreo:?}");
        assert!(
            openchoreo[0].starts_with("v1.0."),
            "the stand-in for v0.17.0: {openchoreo:?}"
        );
        assert!(openchoreo[1].starts_with("v1."), "{openchoreo:?}");
        assert_ne!(openchoreo[0], openchoreo[1]);
        let go_mod = "module x\n\nrequire (\n\tk8s.io/kubernetes v1.37.2 // indirect\n\tk8s.io/api v0.37.2\n)\nreplace k8s.io/client-go => k8s.io/client-go v0.37.2\n";
        assert_eq!(
            pinned_version(go_mod, "k8s.io/kubernetes").as_deref(),
            Some("v1.37.2")
        );
        assert_eq!(pinned_version(go_mod, "k8s.io/client-go"), None);
        assert_eq!(pinned_version(go_mod, "k8s.io/kube"), None);
    }

    #[test]
    fn missing_programs_are_named_with_the_command_that_builds_them() {
        let programs = ClusterPrograms {
            etcd: PathBuf::from("/nonexistent/etcd"),
            kube_apiserver: PathBuf::from("/nonexistent/kube-apiserver"),
            kube_controller_manager: PathBuf::from("/nonexistent/kcm"),
        };
        let message = programs.check().unwrap_err().to_string();
        assert!(
            message.contains("kube-apiserver (/nonexistent/kube-apiserver)"),
            "{message}"
        );
        assert!(message.contains("cargo xtask peers build"), "{message}");
        assert!(message.contains("etcd-server"), "{message}");
    }
}
