//! The real programs ours must work with, called peers: the Kubernetes API server and
//! controller manager (built from pinned sources by `cargo xtask peers build`), etcd (from the
//! system), and OpenChoreo's cluster gateway and agent.
//!
//! - [`cache`]: where the built programs are and which versions are pinned (the go.mod files in
//!   `peers/`, compiled in).
//! - [`cluster`]: one real cluster's certificates, admin kubeconfig and command lines, as
//!   kubeadm would set them up without nodes.
//! - [`local`]: such a cluster running as local processes, for tests.

pub mod cache;
pub mod cluster;
pub mod local;

pub use cache::{ClusterPrograms, PeersError};
pub use cluster::{ClusterPorts, RealCluster};
pub use local::LocalCluster;
