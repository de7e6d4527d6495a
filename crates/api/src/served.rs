//! The plane CRs an agent says it serves (`cluster-agent run --serve`).
//!
//! Admission rests on who may create plane CRs: a BuildPlane in another namespace that copies a
//! build cluster's public `clientCA` under the same planeID verifies the agent's certificate
//! just as well as the CR its owner wrote. The build cluster's side gets a say with this list:
//! the agent sends it on the upgrade (`?serves=org1/bp,_cluster/shared`), and the gateway grants
//! the connection only the CRs it names. An agent that sends none (OpenChoreo's) serves every CR
//! that verifies it, as before.
//!
//! An entry is `<namespace>/<name>` (a BuildPlane), `_cluster/<name>` (a ClusterBuildPlane),
//! and `*` as the name for every CR of that namespace or every ClusterBuildPlane.

use std::{fmt, str::FromStr};

use crate::{CrKey, names::CLUSTER_SCOPE_SEGMENT};

/// The separator of entries in the upgrade query and in the `SERVE` environment variable.
pub const SEPARATOR: char = ',';

/// The name that stands for every CR of a scope.
const ANY_NAME: &str = "*";

/// The CRs an agent serves: empty means every CR that admits its certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedCrs(Vec<ServedCr>);

/// One entry of [`ServedCrs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedCr {
    scope: Scope,
    /// `None`: every CR of the scope.
    name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    Namespace(String),
    Cluster,
}

/// Why an entry is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServedCrError {
    /// Not `<namespace>/<name>`.
    #[error("{0:?} is not <namespace>/<name>, <namespace>/*, _cluster/<name> or _cluster/*")]
    Shape(String),
    /// The namespace is not a DNS-1123 label.
    #[error("{0:?}: the namespace is not a DNS-1123 label")]
    Namespace(String),
    /// The name is not a DNS-1123 subdomain.
    #[error("{0:?}: the name is not a DNS-1123 subdomain")]
    Name(String),
}

impl ServedCrs {
    /// Every CR (no restriction).
    pub fn any() -> Self {
        Self::default()
    }

    /// Whether the list restricts nothing.
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the agent serves `cr`.
    pub fn allows(&self, cr: &CrKey) -> bool {
        self.is_any() || self.0.iter().any(|entry| entry.allows(cr))
    }

    /// The entries.
    pub fn entries(&self) -> &[ServedCr] {
        &self.0
    }

    /// Parses a comma-separated list (the query parameter, the environment variable); empty
    /// entries are skipped, so an empty text is [`ServedCrs::any`].
    pub fn parse_list(text: &str) -> Result<Self, ServedCrError> {
        text.split(SEPARATOR)
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl FromIterator<ServedCr> for ServedCrs {
    fn from_iter<I: IntoIterator<Item = ServedCr>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Comma-separated, as [`ServedCrs::parse_list`] reads it.
impl fmt::Display for ServedCrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "{SEPARATOR}")?;
            }
            write!(f, "{entry}")?;
        }
        Ok(())
    }
}

impl ServedCr {
    fn allows(&self, cr: &CrKey) -> bool {
        let scope = match (&self.scope, cr.namespace.as_deref()) {
            (Scope::Cluster, None) => true,
            (Scope::Namespace(ns), Some(cr_ns)) => ns == cr_ns,
            _ => false,
        };
        scope && self.name.as_deref().is_none_or(|name| name == cr.name)
    }
}

impl fmt::Display for ServedCr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match &self.scope {
            Scope::Namespace(ns) => ns.as_str(),
            Scope::Cluster => CLUSTER_SCOPE_SEGMENT,
        };
        write!(f, "{scope}/{}", self.name.as_deref().unwrap_or(ANY_NAME))
    }
}

impl FromStr for ServedCr {
    type Err = ServedCrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (scope, name) = text
            .split_once('/')
            .ok_or_else(|| ServedCrError::Shape(text.to_owned()))?;
        let scope = if scope == CLUSTER_SCOPE_SEGMENT {
            Scope::Cluster
        } else if is_dns_label(scope) {
            Scope::Namespace(scope.to_owned())
        } else {
            return Err(ServedCrError::Namespace(text.to_owned()));
        };
        let name = if name == ANY_NAME {
            None
        } else if is_dns_subdomain(name) {
            Some(name.to_owned())
        } else {
            return Err(ServedCrError::Name(text.to_owned()));
        };
        Ok(Self { scope, name })
    }
}

fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> ServedCrs {
        ServedCrs::parse_list(text).unwrap()
    }

    #[test]
    fn empty_serves_everything() {
        let any = list(" , ");
        assert!(any.is_any());
        assert!(any.allows(&CrKey::namespaced("org1", "bp")));
        assert!(any.allows(&CrKey::cluster("shared")));
    }

    #[test]
    fn entries_match_by_scope_and_name() {
        let served = list("org1/bp,org2/*,_cluster/shared");
        assert!(served.allows(&CrKey::namespaced("org1", "bp")));
        assert!(!served.allows(&CrKey::namespaced("org1", "other")));
        assert!(served.allows(&CrKey::namespaced("org2", "anything")));
        assert!(!served.allows(&CrKey::namespaced("org3", "bp")));
        assert!(served.allows(&CrKey::cluster("shared")));
        assert!(!served.allows(&CrKey::cluster("bp")));
        // A namespace called like the cluster segment cannot exist (`_` is not in a label), and
        // a cluster entry never matches a namespaced CR of the same name.
        assert!(!list("_cluster/*").allows(&CrKey::namespaced("org1", "bp")));
        assert!(!list("org1/*").allows(&CrKey::cluster("bp")));
    }

    #[test]
    fn malformed_entries_are_refused_with_the_entry() {
        for (text, expected) in [
            ("bp", ServedCrError::Shape("bp".into())),
            ("Org1/bp", ServedCrError::Namespace("Org1/bp".into())),
            ("/bp", ServedCrError::Namespace("/bp".into())),
            ("org1/", ServedCrError::Name("org1/".into())),
            ("org1/a/b", ServedCrError::Name("org1/a/b".into())),
            ("org1/b_p", ServedCrError::Name("org1/b_p".into())),
            ("*/bp", ServedCrError::Namespace("*/bp".into())),
        ] {
            assert_eq!(ServedCrs::parse_list(text), Err(expected), "{text}");
        }
    }

    #[test]
    fn display_round_trips() {
        let served = list("org1/bp, org2/* ,_cluster/shared.name");
        assert_eq!(served.to_string(), "org1/bp,org2/*,_cluster/shared.name");
        assert_eq!(list(&served.to_string()), served);
    }
}
