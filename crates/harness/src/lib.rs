//! The end-to-end harness behind `cargo xtask e2e`: scenario files, backends, runner, reports.
//!
//! A scenario (see [`scenario::Scenario`]) is a YAML file of steps; each step runs operations
//! (apply, assert, kubectl, faults, component lifecycle, requests, load) against an
//! environment that a [`backend::Backend`] provides: two clusters (control and build) with the
//! gateway and controller deployed, and agents started by the scenario.
//! The runner ([`runner`]) runs scenarios in parallel where they allow it and writes JUnit,
//! JSON and HTML reports ([`report`]).

pub mod backend;
pub mod balancer;
pub mod bindings;
pub mod build;
pub mod chaos;
pub mod duration;
pub mod engine;
pub mod k3d;
pub mod kube_ops;
pub mod lint;
pub mod load;
pub mod matcher;
pub mod pass_rate;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod report;
pub mod result;
pub mod runner;
pub mod scenario;

/// Installs ring as rustls's process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
