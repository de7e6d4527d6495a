//! The k3d backend: real k3s clusters (control and build) made with k3d, the component images,
//! manifests rendered from `k3d/values.yaml`, and the command plans that set it all up.
//!
//! - [`values`]: `k3d/values.yaml`, with OpenChoreo's Helm value names.
//! - [`config`]: k3d `v1alpha5` Simple configs and their schema check.
//! - [`render`]: manifests (namespaces, RBAC, Deployments, Services, CoreDNS rewrite).
//! - [`plan`]: every command of `up`, `deploy`, `down`, `status` as data (`--dry-run` prints it).
//! - [`exec`]: runs plans (real processes, or a scripted executor in tests).
//! - [`pki`]: the deployment's certificates.
//! - [`structural`]: a field-by-field check of built-in kinds against k8s-openapi's types.
//! - [`backend`]: [`K3dBackend`], the harness's `Backend` for `cargo xtask e2e --backend k3d`.
//!
//! Cross-cluster path (as OpenChoreo's multi-cluster k3d setup): the clusters sit on separate
//! Docker networks; the control cluster's k3d load balancer publishes the gateway on host ports
//! 38443 (agents) and 38444 (internal API); agents in the build cluster dial
//! `wss://cluster-gateway.openchoreo.localhost:38443/ws`, which CoreDNS rewrites to
//! `host.k3d.internal`, the Docker host.

pub mod backend;
pub mod config;
pub mod exec;
pub mod pki;
pub mod plan;
pub mod render;
pub mod structural;
pub mod values;

use std::path::PathBuf;

pub use backend::{K3dBackend, K3dBackendOptions};

/// Errors of the k3d backend.
#[derive(Debug, thiserror::Error)]
pub enum K3dError {
    /// `k3d/values.yaml` is invalid.
    #[error("invalid k3d values: {0}")]
    Values(String),
    /// A k3d config violates k3d's v1alpha5 schema.
    #[error("invalid k3d config: {}", .0.join("; "))]
    K3dConfig(Vec<String>),
    /// Docker, k3d or kubectl is missing (the message says what to install).
    #[error("{0}")]
    MissingTools(String),
    /// A step of a plan failed.
    #[error("step `{step}` failed: {command}: {detail}")]
    StepFailed {
        /// The step's description.
        step: String,
        /// The command line.
        command: String,
        /// Exit code and output tail.
        detail: String,
    },
    /// Generating or loading certificates failed.
    #[error("certificates: {0}")]
    Pki(String),
    /// File system error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The repository root (two levels above this crate).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the harness crate lives at crates/harness")
        .to_path_buf()
}
